"""The application's lifecycle: its instances, readiness and health, swap and rollback, crash
watch (``supervisor``), the sockets it owns (``listeners``, ``sockdiag``), the app's room
(``room``), the answer while no version runs (``unavailable``), the hand-off relay
(``handoff_relay``) and the log ring the app's output goes to (``logring``).
"""
