"""The build machine and the operator: ``sshfwup upload`` (``client``, ``progress_display``), fleets
(``fleet``), ``sshfwup firmware ...`` (``firmware``, ``firmware_build``, ``firmware_delta``,
``firmware_image``, ``firmware_keys``, ``firmware_remote``, ``sign``, ``zipwrite``) and the
README's demo (``demo``). Never imported by ``sshfwup serve``.
"""
