# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Argument specs of the collection's modules, shared by the module stubs and the action plugins."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

CONNECTION_ARGS = dict(
    host=dict(type="str"),
    port=dict(type="int"),
    user=dict(type="str"),
    key=dict(type="path", no_log=False),
    known_hosts=dict(type="path"),
    host_key_checking=dict(type="bool"),
    timeout=dict(type="float", default=300.0),
)

FIRMWARE_UPDATE_ARGS = dict(
    CONNECTION_ARGS,
    firmware=dict(type="path", required=True),
    releases=dict(type="path"),
    delta_from=dict(type="path"),
    wait=dict(type="bool", default=True),
    allow_reboot=dict(type="bool", default=True),
)

REBOOT_ARGS = dict(
    CONNECTION_ARGS,
    pending_only=dict(type="bool", default=True),
    wait=dict(type="bool", default=True),
)

FIRMWARE_FACTS_ARGS = dict(CONNECTION_ARGS)
FIRMWARE_FACTS_ARGS["timeout"] = dict(type="float", default=30.0)

CONTROLLER_ONLY = (
    "this module runs on the Ansible controller through its action plugin (devices refuse shells); "
    "call it as sshfwup.device.{0} with the collection installed, never with the module file alone"
)
