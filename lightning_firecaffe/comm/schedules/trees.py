"""Reduction-tree schedules: FireCaffe's tree, its pipelined form, NCCL-style double tree, two-level tree.

Builders work on a list of member ranks so they compose (``two_level`` runs them inside nodes and across
node leaders). All functions are pure: they return ``Transfer`` lists or ``Schedule`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .core import Schedule, Transfer, build, reversed_as_broadcast
from .registry import paired_pieces, pieces, register_algorithm, whole_buffer


@dataclass(frozen=True)
class Tree:
    """A rooted tree over ranks, given by each node's parent (the root's parent is None)."""

    parent: dict[int, int | None]

    @property
    def root(self) -> int:
        return next(node for node, p in self.parent.items() if p is None)

    def heights(self) -> dict[int, int]:
        """Longest distance from each node down to a leaf."""
        height = {node: 0 for node in self.parent}
        for node in sorted(self.parent, key=self.depths().__getitem__, reverse=True):
            p = self.parent[node]
            if p is not None:
                height[p] = max(height[p], height[node] + 1)
        return height

    def depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}

        def walk(node: int) -> int:
            if node not in depth:
                p = self.parent[node]
                depth[node] = 0 if p is None else walk(p) + 1
            return depth[node]

        for node in self.parent:
            walk(node)
        return depth


def heap_tree(members: Sequence[int], arity: int) -> Tree:
    """k-ary heap layout: member i's parent is member (i - 1) // arity. Depth ceil(log_k p)."""
    return Tree({m: (None if i == 0 else members[(i - 1) // arity]) for i, m in enumerate(members)})


def inorder_tree(members: Sequence[int]) -> Tree:
    """Balanced in-order binary tree over positions 1..n: every odd position is a leaf.

    The root of an interval is the position with the most trailing zero bits, so odd positions can only
    be chosen for one-element intervals. This is what makes the complementary second tree possible.
    """
    parent: dict[int, int | None] = {}

    def place(lo: int, hi: int, up: int | None) -> None:
        if lo > hi:
            return
        root = max(range(lo, hi + 1), key=lambda x: x & -x)
        parent[members[root - 1]] = None if up is None else members[up - 1]
        place(lo, root - 1, root)
        place(root + 1, hi, root)

    place(1, len(members), None)
    return Tree(parent)


def knomial_reduce(members: Sequence[int], arity: int, lo: int, hi: int) -> list[Transfer]:
    """FireCaffe's reduction tree: at level l, groups of ``arity`` subtrees merge into their first member.

    A leader receives from its children one per round, so it never holds more than one extra buffer and
    the binary case takes exactly ceil(log2 p) rounds of one whole buffer each.
    """
    transfers = []
    n, stride, level = len(members), 1, 0
    while stride < n:
        for leader in range(0, n, stride * arity):
            for j in range(1, arity):
                child = leader + j * stride
                if child < n:
                    transfers.append(Transfer(level * (arity - 1) + j - 1, members[child], members[leader], lo, hi))
        stride *= arity
        level += 1
    return transfers


def pipelined_allreduce(trees: Sequence[tuple[Tree, Sequence[int]]], first_round: int = 0) -> list[Transfer]:
    """Stream chunks up and down one or more trees at once (each tree carries its own chunks).

    A node of height h sends its j-th chunk to its parent in round j + h, after all children (height
    < h) did; the root of height H owns the j-th sum after round j + H - 1 and a node of depth d receives
    it in round j + H + d - 1, so reduction and broadcast overlap and every level works at once.
    """
    transfers = []
    for tree, chunks in trees:
        height, depth = tree.heights(), tree.depths()
        top = height[tree.root]
        for node, p in tree.parent.items():
            if p is None:
                continue
            for j, chunk in enumerate(chunks):
                transfers.append(Transfer(first_round + j + height[node], node, p, chunk, chunk + 1))
                transfers.append(
                    Transfer(first_round + j + top + depth[node] - 1, p, node, chunk, chunk + 1, reduce=False)
                )
    return transfers


@register_algorithm(
    "tree",
    order=10,
    chunking=whole_buffer,
    uses_arity=True,
    summary="FireCaffe's reduction tree: reduce to rank 0, broadcast back (k-nomial, `arity`)",
    cost="2 ceil(log2 p) N/B",
)
def tree(world_size: int, num_chunks: int = 1, arity: int = 2, **_: object) -> Schedule:
    """Reduce the whole buffer up a k-nomial tree to rank 0, then broadcast it back down (mirror image)."""
    members = list(range(world_size))
    up = knomial_reduce(members, arity, 0, num_chunks)
    down = reversed_as_broadcast(up, first_round=1 + max((t.round for t in up), default=-1))
    return build("tree", world_size, num_chunks, up + down)


@register_algorithm(
    "pipelined_tree",
    order=20,
    chunking=pieces,
    uses_arity=True,
    summary="the buffer streams in `chunk_bytes` pieces up and down a k-ary tree, all levels busy",
    cost="~3 N/B",
)
def pipelined_tree(world_size: int, num_chunks: int = 1, arity: int = 2, **_: object) -> Schedule:
    """The tree with the buffer cut into chunks that stream through a k-ary heap tree.

    (A k-nomial root has log p children and would serialise the stream; a heap tree has at most k.)
    """
    members = list(range(world_size))
    transfers = pipelined_allreduce([(heap_tree(members, arity), range(num_chunks))])
    return build("pipelined_tree", world_size, num_chunks, transfers)


@register_algorithm(
    "double_tree",
    order=30,
    chunking=paired_pieces,
    summary="two complementary pipelined trees, each carrying half (NCCL's design)",
    cost="~2 N/B, log p depth",
)
def double_tree(world_size: int, num_chunks: int = 2, **_: object) -> Schedule:
    """Two complementary pipelined binary trees, each carrying half of the chunks.

    Tree A places rank r at in-order position r + 1, tree B at position (r + 1) mod p + 1. Interior nodes
    sit at even positions, so a rank interior in one tree is a leaf in the other: every link carries
    about the same load and the pair moves the buffer at ~2N/B with log(p) depth.
    """
    members = list(range(world_size))
    tree_a = inorder_tree(members)
    shifted = [members[(pos - 2) % world_size] for pos in range(1, world_size + 1)]  # position -> rank
    tree_b = inorder_tree(shifted)
    half = (num_chunks + 1) // 2
    transfers = pipelined_allreduce([(tree_a, range(0, half)), (tree_b, range(half, num_chunks))])
    return build("double_tree", world_size, num_chunks, transfers)


def nodes_of(world_size: int, ranks_per_node: int) -> list[list[int]]:
    """Consecutive ranks share a node, as Lightning numbers them (node_rank * devices + local_rank)."""
    return [list(range(s, min(s + ranks_per_node, world_size))) for s in range(0, world_size, ranks_per_node)]


@register_algorithm(
    "two_level",
    order=40,
    chunking=pieces,
    uses_arity=True,
    uses_ranks_per_node=True,
    eligible=lambda world_size, ranks_per_node: ranks_per_node > 1,  # else it is pipelined_tree
    summary="reduce inside each node, pipelined tree across node leaders, broadcast inside nodes",
    cost="one buffer per NIC",
)
def two_level(world_size: int, num_chunks: int = 1, arity: int = 2, ranks_per_node: int = 1, **_: object) -> Schedule:
    """Reduce inside each node, all-reduce across node leaders with a pipelined tree, broadcast inside nodes.

    Only one rank per node touches the network, so the node's NIC carries one buffer instead of one per GPU.
    """
    nodes = nodes_of(world_size, max(1, ranks_per_node))
    inside = [t for node in nodes for t in knomial_reduce(node, arity, 0, num_chunks)]
    inside_rounds = 1 + max((t.round for t in inside), default=-1)
    leaders = [node[0] for node in nodes]
    across = pipelined_allreduce([(heap_tree(leaders, arity), range(num_chunks))], first_round=inside_rounds)
    after = 1 + max((t.round for t in across), default=inside_rounds - 1)
    back = reversed_as_broadcast(inside, first_round=after)
    return build("two_level", world_size, num_chunks, inside + across + back)
