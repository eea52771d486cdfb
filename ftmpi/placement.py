"""Where ranks go across nodes: which server slots form each shard's chain, and the node a
replacement is spawned on.

Pure functions of node names (``Runtime.nodes``: every world rank's ``MPI_Get_processor_name``,
gathered at start and after every Merge). They read no clock, no environment and iterate no
set, so every rank computes the same answer from the same gathered names and no placement
decision needs a message of its own. No MPI here.

- :func:`initial_chains` spreads each shard's chain over the nodes of its servers: one lost node
  never takes a whole chain when the servers' nodes allow it. With every server on one node it
  is the contiguous layout (shard ``k``: slots ``k*R .. k*R+R-1``).
- :func:`replacement_nodes` picks a live node (or a listed spare) for each replacement, never a
  node that has lost all its ranks of this job (its daemon may be gone with them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def contiguous_chains(num_slots: int, chain_length: int) -> list[list[int]]:
    """Shard ``k``'s chain: slots ``k*R .. k*R+R-1`` (R = ``chain_length``)."""
    return [list(range(k, k + chain_length)) for k in range(0, num_slots, chain_length)]


def spread(chains: Sequence[Sequence[int]], slot_nodes: Sequence[str]) -> bool:
    """Whether no node holds more replicas of one chain than it must: with ``c`` server slots
    on a node and ``n`` chains, some chain holds at least ``ceil(c / n)`` of them
    (pigeonhole); a spread layout has no chain holding more. So every chain's replicas are on
    distinct nodes whenever no node has more than ``n`` server slots."""
    per_node = Counter(slot_nodes)
    n = len(chains)
    return all(
        count <= -(-per_node[node] // n)
        for chain in chains
        for node, count in Counter(slot_nodes[s] for s in chain).items()
    )


def initial_chains(slot_nodes: Sequence[str], chain_length: int) -> list[list[int]]:
    """Each shard's chain of server slots (head first) at the start of a job; ``slot_nodes[s]``
    is server slot ``s``'s node, ``chain_length`` the servers per shard (1 without chains).

    Guarantees: ``len(slot_nodes) // chain_length`` chains of ``chain_length`` slots, every slot
    in exactly one, slots ascending inside a chain and chains ordered by their head; the result
    is :func:`spread` (one lost node takes at most ``ceil(c / n)`` replicas of a chain, the
    fewest possible, so none when no node holds more than ``n`` server slots); it is
    :func:`contiguous_chains` whenever that is spread, in particular when every server is on one
    node and when ``chain_length`` is 1. Raises ``ValueError`` unless ``chain_length`` divides
    the number of slots.

    Otherwise the slots, grouped by node (nodes in the order of their first slot), are dealt
    round-robin onto the chains: a node's run of ``c`` consecutive slots lands on ``c``
    consecutive chains (mod ``n``), at most ``ceil(c / n)`` on any one.
    """
    if chain_length < 1 or len(slot_nodes) % chain_length:
        raise ValueError(
            f"{len(slot_nodes)} server slots do not form chains of {chain_length}; "
            "use a number of servers that is a multiple of the chain length"
        )
    contiguous = contiguous_chains(len(slot_nodes), chain_length)
    if spread(contiguous, slot_nodes):
        return contiguous
    first = {node: i for i, node in enumerate(dict.fromkeys(slot_nodes))}
    grouped = sorted(range(len(slot_nodes)), key=lambda s: (first[slot_nodes[s]], s))
    n = len(contiguous)
    return sorted(sorted(grouped[k::n]) for k in range(n))


def replacement_nodes(
    live_nodes: Sequence[str],
    spares: Sequence[str],
    shards: Sequence[int | None],
    chain_nodes: Sequence[Sequence[str]],
) -> list[str]:
    """The node for each replacement, in the order of ``shards``.

    ``live_nodes``: the node of every live rank of the job (``Runtime.nodes`` after the
    Shrink). ``spares``: nodes kept free for replacements (``Config.spares``). ``shards``: per
    replacement, the shard whose chain the replacement server joins, ``None`` for a worker.
    ``chain_nodes[k]``: the nodes of shard ``k``'s live servers.

    Guarantees: every node returned holds a live rank or is a spare (a node whose ranks all
    died is never chosen: its daemon may be gone). Each replacement takes, in this order of
    preference, the node holding the fewest members of its chain (a worker has none, so this
    never decides for a worker), a spare node, the node with the fewest ranks (live ones plus
    the replacements placed before it in this call), the earliest node (live nodes in the order
    of their first rank, then spares as listed). A member of the same chain weighs more than
    spareness: a spare that already holds a member (a replacement of earlier) ranks after a
    node that holds none. Raises ``ValueError`` when there is no candidate node at all.
    """
    candidates = list(dict.fromkeys([*live_nodes, *spares]))
    if not candidates:
        raise ValueError("no live node and no spare node to place a replacement on")
    spare = frozenset(spares)
    load = Counter(live_nodes)
    members = [Counter(nodes) for nodes in chain_nodes]
    placed: list[str] = []
    for shard in shards:
        mates = members[shard] if shard is not None else Counter[str]()
        node = min(candidates, key=lambda n: (mates[n], n not in spare, load[n]))
        load[node] += 1
        mates[node] += 1
        placed.append(node)
    return placed
