"""The boot state: the bootloader's environment (``bootenv``) and the root slots (``slots``).
"""
