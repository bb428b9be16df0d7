"""The SSH front, a process of its own (``front``: the supervisor's child, restarted when it
dies): the listener and login (``server``, ``authkeys``, ``admission``, ``gate``), the transports
that carry an upload (the ``fwup`` subsystem in ``server``, ``sftp``, ``scp``), the commands
(``commands``), and the log filter against forged lines (``logsafe``). The only package that
imports asyncssh's server side; it hands bytes to :mod:`sshfwup.update`.
"""
