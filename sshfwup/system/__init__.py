"""What Linux says, for every room: files written atomically (``fsutil``), processes by pid and
start time (``procs``), who holds a port (``ports``).
"""
