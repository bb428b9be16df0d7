"""The build machine and the operator: ``sshfwup upload`` (``client``, ``progress_display``), fleets
(``fleet``), ``sshfwup firmware ...`` (the command line ``firmware``, its commands
``firmware_cmd*``, and ``firmware_build``, ``firmware_delta``, ``firmware_image``, ``firmware_keys``,
``firmware_remote``, ``firmware_sign``) and the README's demo (``demo``). Never imported by ``sshfwup serve``.
"""
