"""moe ops (see module docstring once filled)."""

from __future__ import annotations
