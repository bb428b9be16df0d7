"""The SSH front: the listener and login (``server``, ``authkeys``, ``admission``), the transports
that carry an upload (the ``fwup`` subsystem in ``server``, ``sftp``, ``scp``), the commands
(``commands``), and the log filter against forged lines (``logsafe``). The only package that
imports asyncssh's server side; it hands bytes to :mod:`sshfwup.update`.
"""
