"""Which token attends to which: the single source of the topo-pack mask.

Every backend reads the rules through this module. The dense reference and
FlexAttention evaluate :func:`allowed` elementwise; the sparse backends walk
:func:`key_groups`, the same edges grouped by how they are stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

GLOBAL, SUMMARY, PATCH = 0, 1, 2  # values of TopoLayout.token_kind


class KeyGroup(Enum):
    """A set of keys defined relative to the query token."""

    SLIDE_GLOBAL = "the global token of the query's slide"
    PACK_PATCHES = "the patches of the query's pack"
    PACK_SUMMARY = "the summary token of the query's pack"
    SLIDE_SUMMARIES = "every summary token of the query's slide"
    SLIDE_ALL = "every token of the query's slide"


@dataclass(frozen=True)
class TopoRules:
    """Optional edges on top of the authors' mask; one flag per edge.

    Frozen and hashable, so kernels can take the flags as compile-time constants.
    """

    patch_to_summary: bool = False  # a patch also attends to its pack's summary
    global_to_all: bool = False  # the global token attends to its whole slide

    @property
    def name(self) -> str:
        return {PAPER: "paper", BIDIRECTIONAL: "bidirectional"}.get(self, repr(self))


PAPER = TopoRules()
BIDIRECTIONAL = TopoRules(patch_to_summary=True, global_to_all=True)
RULES_BY_NAME = {"paper": PAPER, "bidirectional": BIDIRECTIONAL}


def key_groups(rules: TopoRules) -> dict[int, frozenset[KeyGroup]]:
    """For each query kind, the key groups it attends to."""
    G = KeyGroup
    patch = {G.SLIDE_GLOBAL, G.PACK_PATCHES}
    if rules.patch_to_summary:
        patch.add(G.PACK_SUMMARY)
    summary = {G.SLIDE_GLOBAL, G.PACK_PATCHES, G.SLIDE_SUMMARIES}  # self is a slide summary
    glob = {G.SLIDE_ALL} if rules.global_to_all else {G.SLIDE_GLOBAL}
    return {PATCH: frozenset(patch), SUMMARY: frozenset(summary), GLOBAL: frozenset(glob)}


# What the sparse backends (portable, Triton) compute per query kind: (the key groups they
# always attend to, the key groups a rule flag may add). One table for both backends.
SPARSE_KEY_GROUPS = {
    PATCH: (frozenset({KeyGroup.SLIDE_GLOBAL, KeyGroup.PACK_PATCHES}), frozenset({KeyGroup.PACK_SUMMARY})),
    SUMMARY: (frozenset({KeyGroup.SLIDE_GLOBAL, KeyGroup.PACK_PATCHES, KeyGroup.SLIDE_SUMMARIES}), frozenset()),
    GLOBAL: (frozenset(), frozenset({KeyGroup.SLIDE_GLOBAL, KeyGroup.SLIDE_ALL})),
}


def sparse_key_groups(rules: TopoRules, backend: str) -> dict[int, frozenset[KeyGroup]]:
    """key_groups(rules), checked against SPARSE_KEY_GROUPS; NotImplementedError names what `backend` lacks."""
    groups = key_groups(rules)
    for kind, gs in groups.items():
        always, optional = SPARSE_KEY_GROUPS[kind]
        # every row must see its slide's global token: it seeds the kernels' online softmax
        if always - gs or gs - always - optional or not gs & {KeyGroup.SLIDE_GLOBAL, KeyGroup.SLIDE_ALL}:
            raise NotImplementedError(
                f"{backend} backend: token kind {kind} attends to {sorted(g.name for g in gs)}, but the sparse "
                f"backends compute {sorted(g.name for g in always)} plus any of {sorted(g.name for g in optional)}")
    return groups


def in_group(group: KeyGroup, q_pack, q_slide, k_kind, k_pack, k_slide):
    """Elementwise: is the key in `group` of the query? Works on tensors or ints."""
    same_slide = q_slide == k_slide
    if group is KeyGroup.SLIDE_GLOBAL:
        return same_slide & (k_kind == GLOBAL)
    if group is KeyGroup.PACK_PATCHES:
        return (q_pack == k_pack) & (k_kind == PATCH)
    if group is KeyGroup.PACK_SUMMARY:
        return (q_pack == k_pack) & (k_kind == SUMMARY)
    if group is KeyGroup.SLIDE_SUMMARIES:
        return same_slide & (k_kind == SUMMARY)
    if group is KeyGroup.SLIDE_ALL:
        return same_slide
    raise ValueError(f"unknown key group {group!r}")


def allowed(rules: TopoRules, q_kind, q_pack, q_slide, k_kind, k_pack, k_slide):
    """Elementwise mask: may a query with these attributes attend to this key?

    Arguments broadcast like tensors (the reference passes [L, 1] and [1, L];
    FlexAttention's mask_mod passes scalars).
    """
    result = None
    for kind, groups in key_groups(rules).items():
        for group in groups:
            edge = (q_kind == kind) & in_group(group, q_pack, q_slide, k_kind, k_pack, k_slide)
            result = edge if result is None else result | edge
    return result
