"""Password-database test material: the cheapest hash costs and the passwd writer's type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from popbox.auth.schemes import HashCost

# The tests that are not about a scheme's defaults hash with the cheapest parameters
# the libraries accept, so the suite stays fast on two shared cores.
CHEAP = HashCost(argon2_time_cost=1, argon2_memory_kib=64, bcrypt_rounds=4, sha_crypt_rounds=1000)

WritePasswd = Callable[[str], Path]
