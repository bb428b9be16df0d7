"""The application's lifecycle: the supervisor that owns it (``supervisor``) and its parts — its
instances (``instance``, ``launcher``), readiness and health (``readiness``, ``health``), the sockets
across versions (``steering``), swap and rollback (``swap``, with ``handoff_swap`` and the hand-off
relay ``handoff_relay``), crash watch (``crashes``), the stand-in while no version runs
(``standin``, answering with ``unavailable``), what it tells (``events``) and raises (``errors``);
the sockets it owns (``listeners``, the reuseport program ``reuseport``, the probes ``probes``,
``sockdiag``), the app's room (``room``) and the log ring the app's output goes to (``logring``);
and the SSH front as its child process (``front_process``), with the local protocol between the
two (``control`` the supervisor's side, ``client`` the front's).
"""
