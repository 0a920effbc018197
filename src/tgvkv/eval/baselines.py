"""The policies of the accuracy harness, by name: an alias of :mod:`tgvkv.presses` (where the
baselines and the TGV-KV ablations live, with their description)."""

from ..presses import POLICIES, make_policy, policy_class, policy_names

__all__ = ["POLICIES", "make_policy", "policy_class", "policy_names"]
