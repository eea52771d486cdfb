"""Worker side of the server protocol: flat buffers, INIT, push/pull, hyper-parameters, stats.

A :class:`ServerClient` holds the model-wide flat gradient and weight buffers (shard ``s``
occupies ``[shard.start, shard.start + shard.numel)``) and talks to the servers that own the
shards. Pushes to several servers are in flight at once; each reply's weights are received
straight into the weight buffer. Every call completes, or raises ``CommTimeout``,
``PeerFailure`` or ``RemoteError`` (a server refused the request and said why).

On a chain with ``tail`` ack a head answers a push once every *earlier* update is committed,
while this one still travels down the chain (``ChainLink.submit``). So the worker that pushed
keeps the gradient of its last answered push per shard (:attr:`ServerClient.kept`) until its
next push is answered, and after a recovery sends it again (:meth:`ServerClient.repush`)
before anything else: a head that died before forwarding it loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from ftmpi import events, wire
from ftmpi.failpoints import failpoint
from ftmpi.gradlog import Combined
from ftmpi.optim_state import Payload, dtype_name, payload_nbytes, unpack_tensors
from ftmpi.runtime import Runtime
from ftmpi.sharding import Shard
from ftmpi.snapshot import SnapshotError, incompatibility
from ftmpi.wire import Header, Kind


@dataclass
class KeptPush:
    """A push answered before the chain committed it, kept to be sent again."""

    version: int
    """The base version it was pushed with."""
    seq: int
    """Its sequence number (the worker's data position)."""
    hparams: str | None
    """The hyper-parameters in force for it (JSON, as last sent to the shard)."""
    grad: np.ndarray
    """A copy of the gradient."""


class ServerClient:
    """This worker's connection to the parameter servers for one model."""

    def __init__(self, rt: Runtime, shards: Sequence[Shard], dtype: torch.dtype) -> None:
        self.rt = rt
        self.shards = list(shards)
        total = sum(s.numel for s in shards)
        self.dtype = dtype
        self.grads = torch.zeros(total, dtype=dtype)
        self.weights = torch.zeros(total, dtype=dtype)
        self.versions = [0] * len(shards)
        """Version of the weights this worker holds, per shard."""
        self._seq = 0
        self.position = 0
        """This worker's data position; pushes carry it as their sequence number."""
        self._sent_hparams: list[str | None] = [None] * len(shards)
        self.kept: dict[int, KeptPush] = {}
        """Per shard index: this worker's last answered push, until its next is answered."""
        self.repush_due = False
        """Set by :meth:`recovered`: :meth:`repush` sends :attr:`kept` before the next push."""
        self._spare: dict[int, np.ndarray] = {}
        """Per shard index: a kept push's buffer, free again, for the next push's copy."""

    def view(self, buf: torch.Tensor, shard: Shard) -> torch.Tensor:
        return buf[shard.start : shard.start + shard.numel]

    def _server(self, shard: Shard) -> int:
        return self.rt.shard_head(shard.index)

    def _header(
        self, kind: Kind, shard: Shard, nbytes: int, version: int = 0, seq: int | None = None
    ) -> Header:
        self._seq += 1
        if seq is None:
            seq = self.position if kind == Kind.PUSH else self._seq
        return Header(kind, self.rt.run, version, shard.index, seq, self.rt.view, nbytes)

    def _isend(self, shard: Shard, header: Header, payload: np.ndarray | None) -> list[MPI.Request]:
        return wire.isend(
            self.rt.world,
            self._server(shard),
            header,
            payload,
            tag=wire.TAG_HEADER,
            data_tag=wire.TAG_DATA,
            chunk_bytes=self.rt.config.chunk_bytes,
            what=f"sending to server {shard.index}",
        )

    def _isend_request(
        self, shard: Shard, header: Header, doc: np.ndarray, data: Payload, *, bulk: bool = False
    ) -> list[MPI.Request]:
        chunk = self.rt.config.chunk_bytes
        return wire.isend_request(
            self.rt.world,
            self._server(shard),
            header,
            doc,
            data,
            chunk_bytes=chunk,
            data_chunk_bytes=wire.bulk_chunk_bytes(chunk) if bulk else chunk,
            what=f"sending {header.kind.name} to server {shard.index}",
        )

    def _wait(self, reqs: list[MPI.Request], what: str) -> None:
        wire.wait_all(reqs, self.rt.config.timeout, what)

    def _recv_reply_data(self, shard: Shard, out: Payload, what: str) -> None:
        """Receive the payload of ``shard``'s server's last reply header into ``out``."""
        cfg = self.rt.config
        wire.recv_payload(
            self.rt.world,
            self._server(shard),
            out,
            data_tag=wire.TAG_REPLY_DATA,
            chunk_bytes=cfg.chunk_bytes,
            timeout=cfg.timeout,
            what=what,
        )

    def _recv_reply(
        self, shard: Shard, expect: Kind, out: np.ndarray | None, *, payload: bool = True
    ) -> tuple[Header, Any]:
        """Receive one reply from ``shard``'s server; weights go into ``out`` (unless
        ``payload`` is False: then the caller receives the weight chunks itself)."""
        cfg = self.rt.config
        what = f"reply from server {shard.index}"
        header, _ = wire.recv_header(
            self.rt.world, self._server(shard), tag=wire.TAG_REPLY, timeout=cfg.timeout, what=what
        )
        doc: Any = None
        if header.kind in (Kind.JSON, Kind.ERROR):
            buf = np.empty(header.nbytes, dtype=np.uint8)
            self._recv_reply_data(shard, buf, what)
            doc = wire.decode_json(buf)
        if header.kind == Kind.ERROR:
            raise wire.RemoteError(doc["error"])
        if header.kind != expect:
            raise wire.RemoteError(
                f"server {shard.index} answered {header.kind.name} to a {expect.name}"
            )
        if expect == Kind.WEIGHTS:
            assert out is not None
            if header.nbytes != out.nbytes:
                raise wire.RemoteError(
                    f"server {shard.index} sent {header.nbytes} bytes of "
                    f"weights, expected {out.nbytes}"
                )
            if payload:
                self._recv_reply_data(shard, out, what)
        return header, doc

    # ------------------------------------------------------------- requests

    def init_servers(
        self,
        optimizer: str,
        groups: list[dict[str, Any]],
        state: dict[int, tuple[list[dict[str, Any]], list[np.ndarray], dict[str, Any]]],
        shards: Sequence[Shard] | None = None,
    ) -> None:
        """Send each shard's layout, optimizer, weights (from :attr:`weights`, at the version
        this worker holds) and optimizer state to its server (every shard's by default); return
        when every server has acknowledged. A shard missing from ``state`` starts with a fresh
        optimizer state."""
        shards = self.shards if shards is None else list(shards)
        reqs: list[MPI.Request] = []
        keep: list[Any] = []
        for shard in shards:
            table, views, scalars = state.get(shard.index, ([], [], {}))
            weights = self.view(self.weights, shard).numpy().view(np.uint8)
            binary = [weights, *views]  # segments, sent in place
            spec = {
                "shard": shard.to_json(),
                "optimizer": optimizer,
                "groups": groups,
                "dtype": dtype_name(self.dtype),
                "state_table": table,
                "state_scalars": scalars,
                "binary_nbytes": payload_nbytes(binary),
            }
            doc = wire.encode_json(spec)
            keep += [doc, binary]
            header = self._header(Kind.INIT, shard, doc.nbytes, self.versions[shard.index])
            reqs += self._isend_request(shard, header, doc, binary, bulk=True)
            self._sent_hparams[shard.index] = json.dumps(groups, sort_keys=True)
        for shard in shards:
            self._recv_reply(shard, Kind.OK, None)
        self._wait(reqs, "sending INIT")

    def send_hparams(self, shards: Sequence[Shard], groups: list[dict[str, Any]]) -> None:
        """Send param-group hyper-parameters to ``shards``' servers where they changed."""
        text = json.dumps(groups, sort_keys=True)
        reqs: list[MPI.Request] = []
        doc = None
        for shard in shards:
            if self._sent_hparams[shard.index] == text:
                continue
            doc = wire.encode_json(groups) if doc is None else doc
            reqs += self._isend(shard, self._header(Kind.HPARAMS, shard, doc.nbytes), doc)
            self._sent_hparams[shard.index] = text
        self._wait(reqs, "sending hyper-parameters")

    def push_pull(self, shards: Sequence[Shard]) -> None:
        """Push each shard's gradient (from :attr:`grads`), then receive the weights the server
        produced by applying it into :attr:`weights`."""
        reqs: list[MPI.Request] = []
        for shard in shards:
            g = self.view(self.grads, shard).numpy()
            header = self._header(Kind.PUSH, shard, g.nbytes, self.versions[shard.index])
            reqs += self._isend(shard, header, g)
        failpoint("push")
        bases = [self.versions[s.index] for s in shards]
        copies = self._copy_pushed(shards)
        for shard in shards:
            out = self.view(self.weights, shard).numpy()
            header, _ = self._recv_reply(shard, Kind.WEIGHTS, out)
            self.versions[shard.index] = header.version
        self._wait(reqs, "pushing gradients")
        self._keep(shards, bases, copies)

    def push_pull_broadcast(
        self, comm: MPI.Comm, workers: int, me: int, shards: Sequence[Shard]
    ) -> None:
        """Sync mode: the leader of each of ``shards`` (worker ``shard.index % workers``) pushes
        its averaged gradient; the new weights reach every worker over ``comm``, broadcast chunk
        by chunk as they arrive from the server, so the pull and the broadcast overlap. The
        shard's new version is broadcast with them, so every worker's :attr:`versions` stay
        the same (a worker that takes over a shard's lead pushes with the right base)."""
        cfg = self.rt.config
        mine = [s for s in shards if s.index % workers == me]
        bases = [self.versions[s.index] for s in mine]
        reqs: list[MPI.Request] = []
        received: list[tuple[int, np.ndarray]] = []  # (shard, its broadcast version)
        for shard in mine:
            g = self.view(self.grads, shard).numpy()
            header = self._header(Kind.PUSH, shard, g.nbytes, self.versions[shard.index])
            reqs += self._isend(shard, header, g)
        if mine:
            failpoint("push")
        copies = self._copy_pushed(mine)
        for shard in shards:
            root = shard.index % workers
            chunks = wire.chunks(self.view(self.weights, shard).numpy(), cfg.chunk_bytes)
            version = np.zeros(1, dtype=np.int64)
            if root != me:
                with wire.mpi_errors("weight broadcast"):
                    reqs.append(comm.Ibcast(version, root=root))
                    reqs += [comm.Ibcast(c, root=root) for c in chunks]
                received.append((shard.index, version))
                continue
            header, _ = self._recv_reply(
                shard, Kind.WEIGHTS, self.view(self.weights, shard).numpy(), payload=False
            )
            self.versions[shard.index] = version[0] = header.version
            if workers > 1:
                with wire.mpi_errors("weight broadcast"):
                    reqs.append(comm.Ibcast(version, root=root))
                received.append((shard.index, version))  # kept alive until the wait
            with wire.mpi_errors("pulling weights"):
                recvs = [
                    self.rt.world.Irecv(c, source=self._server(shard), tag=wire.TAG_REPLY_DATA)
                    for c in chunks
                ]
            for c, r in zip(chunks, recvs, strict=True):
                wire.wait_all([r], cfg.timeout, f"weights from server {shard.index}")
                if workers > 1:
                    with wire.mpi_errors("weight broadcast"):
                        reqs.append(comm.Ibcast(c, root=root))
        self._wait(reqs, "pushing gradients and broadcasting weights")
        for index, version in received:
            self.versions[index] = int(version[0])
        self._keep(mine, bases, copies)
        if self.kept:  # a worker that no longer leads a shard has nothing to send it again
            self.kept = {k: v for k, v in self.kept.items() if k % workers == me}

    def recovered(self) -> None:
        """After a recovery: send the kept pushes again (:meth:`repush`), and the
        hyper-parameters again with the next push (a server that had them may be gone)."""
        self.repush_due = True
        self._sent_hparams = [None] * len(self.shards)

    def _copy_pushed(self, shards: Sequence[Shard]) -> list[np.ndarray]:
        """Copies of the gradients just sent to ``shards``, made while the push is in flight
        (off this worker's critical path), into buffers :meth:`_keep` gave back; none unless
        heads answer before the commit."""
        if not self.rt.config.answers_before_commit:
            return []
        copies = []
        for shard in shards:
            g = self.view(self.grads, shard).numpy()
            buf = self._spare.pop(shard.index, None)
            buf = buf if buf is not None and buf.shape == g.shape else np.empty_like(g)
            np.copyto(buf, g)
            copies.append(buf)
        return copies

    def _keep(self, shards: Sequence[Shard], bases: list[int], copies: list[np.ndarray]) -> None:
        """Keep the answered pushes to ``shards`` (from base versions ``bases``; their gradients
        in ``copies``), each in place of the one before, whose commit the answer implies; the
        one before's buffer takes the next push's copy."""
        if not self.rt.config.answers_before_commit:
            return
        for shard, base, buf in zip(shards, bases, copies, strict=True):
            old = self.kept.get(shard.index)
            if old is not None:
                self._spare[shard.index] = old.grad
            hparams = self._sent_hparams[shard.index]
            self.kept[shard.index] = KeptPush(base, self.position, hparams, buf)

    def repush(self, shards: Sequence[Shard]) -> None:
        """After a recovery: send each of ``shards``' kept push again, with the
        hyper-parameters in force for it, before anything else reaches the shard. A head that
        has it answers once it is committed; a new head that lacks it applies it. The answer's
        weights are not kept: this worker already holds the weights it produced. In sync mode
        only the shard's leader holds (and so sends) a kept push."""
        if not self.repush_due:
            return
        for shard in shards:
            kept = self.kept.get(shard.index)
            if kept is None:
                continue
            if kept.hparams is not None:
                self.send_hparams([shard], json.loads(kept.hparams))
            header = self._header(Kind.PUSH, shard, kept.grad.nbytes, kept.version, kept.seq)
            reqs = self._isend(shard, header, kept.grad)
            answer, _ = self._recv_reply(shard, Kind.WEIGHTS, np.empty_like(kept.grad))
            self._wait(reqs, "sending a kept push again")
            events.emit(
                self.rt.config.run_dir,
                "repushed",
                role=f"worker {self.rt.role_rank}",
                shard=shard.index,
                base=kept.version,
                server_version=int(answer.version),
            )
        self.repush_due = False

    def replay(self, shard: Shard, combined: Combined) -> int:
        """Send a folded gradient log for ``shard`` (``stateless``); the server applies it once
        (a log resent to the same server is not applied again). Returns the server's version
        after it (the answer is ``OK`` with the version only); :attr:`weights` and
        :attr:`versions` are left as they are (the rebuild ends with a pull)."""
        doc = wire.encode_json(
            {
                "count": combined.count,
                "first_seq": combined.first_seq,
                "last_seq": combined.last_seq,
                "lr_scale": combined.lr_scale,
                "max_age": combined.max_age,
            }
        )
        grad = combined.grad.numpy()
        reqs = self._isend_request(shard, self._header(Kind.REPLAY, shard, doc.nbytes), doc, grad)
        header, _ = self._recv_reply(shard, Kind.OK, None)
        self._wait(reqs, "replaying a gradient log")
        return int(header.version)

    def pull(self, shards: Sequence[Shard]) -> None:
        """Fetch the servers' current weights into :attr:`weights`."""
        reqs: list[MPI.Request] = []
        for shard in shards:
            reqs += self._isend(shard, self._header(Kind.PULL, shard, 0), None)
        failpoint("pull")
        for shard in shards:
            header, _ = self._recv_reply(
                shard, Kind.WEIGHTS, self.view(self.weights, shard).numpy()
            )
            self.versions[shard.index] = header.version
        self._wait(reqs, "pulling weights")

    def stats(self, shards: Sequence[Shard] | None = None) -> list[dict[str, Any]]:
        """The counters of ``shards``' servers (default: every shard's; see
        ``ParameterServer.stats``)."""
        shards = self.shards if shards is None else shards
        reqs: list[MPI.Request] = []
        for shard in shards:
            reqs += self._isend(shard, self._header(Kind.STATS, shard, 0), None)
        out = [self._recv_reply(shard, Kind.JSON, None)[1] for shard in shards]
        self._wait(reqs, "asking for stats")
        return out

    def fetch_state(self) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Every server's optimizer state as (tensors by ``param/key``, JSON scalars)."""
        reqs: list[MPI.Request] = []
        for shard in self.shards:
            reqs += self._isend(shard, self._header(Kind.STATE, shard, 0), None)
        out = []
        for shard in self.shards:
            _, doc = self._recv_reply(shard, Kind.JSON, None)
            buf = np.empty(int(doc["binary_nbytes"]), dtype=np.uint8)
            self._recv_reply_data(shard, buf, f"optimizer state from server {shard.index}")
            out.append((unpack_tensors(doc["table"], buf), doc["scalars"]))
        self._wait(reqs, "asking for optimizer state")
        return out

    def request_json(self, shard: Shard, kind: Kind, version: int = 0) -> Any:
        """Send a payload-free request and return the server's JSON reply."""
        reqs = self._isend(shard, self._header(kind, shard, 0, version), None)
        _, doc = self._recv_reply(shard, Kind.JSON, None)
        self._wait(reqs, f"sending {kind.name}")
        return doc

    def snapshot_now(self) -> list[int]:
        """Have every shard's server write a snapshot now; returns the versions, once durable."""
        return [int(self.request_json(s, Kind.SNAPSHOT)["version"]) for s in self.shards]

    def restore_snapshots(self, *, allow_none: bool = False) -> dict[str, Any] | None:
        """Coordinator side of a checkpoint rollback; returns the versions loaded and every
        worker's data position (with ``allow_none``: None when no shard has any snapshot).

        Sync mode: every shard loads the newest version all shards have, so the model is a
        consistent cut (one update per step: the version is every worker's position). Async
        mode has no consistent cut to return to: each shard loads its own newest valid
        snapshot, and each worker resumes at the smallest position any shard recorded for it,
        so no batch goes unused (a shard that was ahead sees some gradients again)."""
        have = [set(self.request_json(s, Kind.SNAPSHOTS)["versions"]) for s in self.shards]
        if allow_none and not any(have):
            return None
        if self.rt.config.mode == "sync":
            common = set.intersection(*have)
            if not common:
                raise RuntimeError("no snapshot version is valid on every shard; cannot roll back")
            versions = [max(common)] * len(self.shards)
        else:
            if not all(have):
                raise RuntimeError("a shard has no valid snapshot; cannot roll back")
            versions = [max(h) for h in have]
        positions: dict[str, int] = {}
        for s, v in zip(self.shards, versions, strict=True):
            doc = self.request_json(s, Kind.RESTORE, v)
            why = incompatibility(doc, s.to_json()) if "shard" in doc else None
            if why:  # a resumed run's servers have no model to compare with: the worker does
                raise SnapshotError(f"cannot restore {doc.get('path', f'version {v}')}: {why}")
            for w in range(self.rt.num_workers):
                p = int(doc["positions"].get(str(w), 0)) if self.rt.config.mode == "async" else v
                positions[str(w)] = min(positions.get(str(w), p), p)
        return {"versions": versions, "positions": positions}
