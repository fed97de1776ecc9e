# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Options shared by every module that talks to the agent's API (see plugins/module_utils/weft_api.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  api_socket:
    description:
      - Path of the agent's control API socket on the managed host (the agent's C(api_socket) setting).
      - "The agent creates it for root only, so the module needs root (C(become: true) when you log in as
        another user)."
    type: path
    default: /run/weft/weft.sock
  timeout:
    description:
      - Seconds to wait for the agent to answer one request.
    type: float
    default: 10.0
notes:
  - The module runs on the managed host with its system Python and only the standard library; it does not need
    the agent's own Python package.
"""
