"""The DiReDi manufacturer as a Flower strategy: FedAvg's sampling, DiReDi's round.

A round is three exchanges of Flower Messages with each sampled customer (README, "The
protocol"); the manufacturer's process reads only its own public data throughout:

1. ``train`` (``configure_train``): down the shared tutor, the customer's deployed edge and
   the settings; up the neck+head delta and scalars (RD B and RD A ran at the customer).
2. The manufacturer's review of each delta, in worker processes
   (:func:`diredi_sim.federation.manufacturer_review`): substitution, verification, Distill C
   ``public`` on its own data, its half of each table row. Then ``train.distill_c`` (when the
   public+private mode is configured): down tutor' and the customer's edge; up the edge model
   the customer distilled on its own data, which the manufacturer checks on its held-out data
   (:func:`diredi_sim.federation.review_edge`) before it may be deployed.
3. ``evaluate``: down the round's models; up per-class AP, P, R, F1 on the customer's own test
   images, as scalars. Gain, forgetting and the tables come from these replies.

Then the accepted deltas are merged into the shared tutor by the configured rule (the merged
tutor is verified too). Bytes are counted per message type, both ways. Everything it learns
goes to the run folder.

After each round, ``state.json`` (written last, atomically) records what a resumed run needs
(``diredi-sim resume``): the last completed round, the checkpoints of the shared tutor and of
every customer's deployed edge model as of that round, the summary rows and round reports.
``restore`` reads it back; ``round_offset`` numbers the resumed rounds on from there.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.multikrum import select_multikrum

from diredi_sim.deltas import decompress_delta, select_neck_head
from diredi_sim.population import Customer
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import (combine_round, evaluation_models, manufacturer_review, merge_round,
                                   reply_problems, review_edge, rows_from_metrics)
from diredi_sim.logs import current_level, start_worker
from diredi_sim.progress import Tracker, Unit, plan_units
from diredi_sim.runs import Run, release_memory
from diredi_sim.table import distill_c_row
from server.engine import engine_of
from server.ledger import STATE_FORMAT, SUMMARY_COLUMNS, Ledger

def content_bytes(content: RecordDict) -> int:
    """The bytes of a message's records: arrays as Flower counts them (``ArrayRecord.count_bytes``),
    and for metrics and settings each key's length plus 8 bytes per number (as Flower encodes
    them) or the string's length. (``ConfigRecord.count_bytes`` raises on an empty string.)"""
    def scalar(value) -> int:
        return len(value) if isinstance(value, (str, bytes)) else 8

    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        else:
            total += sum(len(key) + (sum(map(scalar, value)) if isinstance(value, list) else scalar(value))
                         for key, value in record.items())
    return total


def read_edges(reply: Message, reference: dict, pipeline) -> dict[str, dict]:
    """The edge models of a ``train.distill_c`` reply (row key -> state): exactly one ArrayRecord
    per configured Distill C loss, under its row key, plus a MetricRecord. Shapes and values
    are checked later (:func:`diredi_sim.verify.check_model_state`)."""
    expected = {distill_c_row("public+private", loss) for loss in pipeline.distill_c_losses}
    keys = set(reply.content.keys()) - {"metrics"}
    if keys != expected:
        raise ValueError(f"records {sorted(keys)}, expected {sorted(expected)} and 'metrics'")
    return {key: reply.content[key].to_torch_state_dict() for key in sorted(expected)}


class InlineExecutor(Executor):
    """An executor that runs each call at once, in this process (tests, stand-in steps)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller through the future, as a pool would
            future.set_exception(exc)
        return future


def step_then_release(step: Callable[..., dict], *args) -> dict:
    """A manufacturer's step in a worker process, whose freed heap then goes back to the system."""
    result = step(*args)
    release_memory()
    return result


class DiReDiStrategy(FedAvg):
    """FedAvg's sampling and round loop; DiReDi's downlink and aggregation."""

    def __init__(self, config: FederationConfig, population: list[Customer], edge_state: dict, run: Run, *,
                 executor: Executor | None = None, review_step: Callable[..., dict] = manufacturer_review,
                 edge_step: Callable[..., dict] = review_edge):
        """``executor`` runs the manufacturer's per-customer steps and the merge: None starts the
        worker processes (:meth:`start_workers`); tests pass an :class:`InlineExecutor` and
        stand-in ``review_step`` / ``edge_step``."""
        sim = config.simulation
        super().__init__(fraction_train=sim.fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
                         min_available_nodes=len(population), arrayrecord_key="tutor")
        self.config, self.engine = config, engine_of(config)
        self.population = population
        self.original_edge = edge_state
        self.deployed_edges: dict[int, dict] = {}  # partition id -> the edge model the customer runs now
        self.partition_of_node: dict[int, int] = {}  # bound at a node's first answer, for the run (_bind)
        self.greeted = False  # this process's first round has asked the nodes who they are (_learn_partitions)
        self.connected: set[int] = set()  # the nodes connected at this round's downlink
        self.run = run
        self.ledger = Ledger(run, config)
        self.review_step, self.edge_step = review_step, edge_step
        self.train_bytes_down: dict[int, int] = {}  # node -> bytes of this round's train message
        self.grid: Grid | None = None  # this round's: the Distill C and evaluate exchanges use it
        self.round_config: ConfigRecord | None = None
        self.tutor_state: dict | None = None
        self.sampled_nodes: list[int] = []  # this round's
        self.round_offset = 0  # rounds completed before this process (a resumed run: set by restore)
        self.pool: Executor | None = executor  # the manufacturer's workers, kept for the run
        self.own_pool = executor is None  # started here (and closed by close())
        self.cpus = self.engine.num_cpus or os.cpu_count() or 1
        # processes and torch threads per step follow from the config alone (not from how many
        # customers answered), so that a customer's results do not depend on the others' failures
        self.server_workers = self.engine.server_workers or min(len(population), self.cpus)
        self.server_threads = max(1, self.cpus // self.server_workers)
        self.tracker: Tracker | None = None  # rounds x sampled customers, opened at the first round (_track)

    def restore(self, state: dict) -> dict | None:
        """Continue after round ``state["last_round"]`` (a run's state.json): deployed edges,
        summary rows and round reports as they were then. Returns the shared tutor's state at
        that point (None: the manufacturer's original tutor)."""
        self.round_offset = int(state["last_round"])
        self.deployed_edges, tutor = self.ledger.restore(state)
        self.partition_of_node = dict(self.ledger.nodes)
        return tutor

    def summary(self) -> None:
        super().summary()
        sim = self.config.simulation
        log(INFO, "\t└──> DiReDi: %d customers, merge '%s', deploy '%s', server workers %s", len(self.population), sim.merge,
            sim.deploy_mode, self.engine.server_workers or "auto")

    # ------------------------------------------------------------------------------ downlink

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling; each message carries the tutor, that customer's edge and the settings."""
        server_round += self.round_offset
        self.tutor_state = arrays.to_torch_state_dict()
        self.neck_head_bytes = sum(v.numel() * 4 for v in select_neck_head(self.tutor_state).values())  # float32
        self.grid, self.round_config = grid, config
        self.start_workers()  # their start-up (importing torch: seconds) overlaps the customers' work
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        self.connected = set(grid.get_node_ids())  # after FedAvg's sampling has waited for the nodes
        self.sampled_nodes = [message.metadata.dst_node_id for message in sampled]
        self._learn_partitions(grid, self.sampled_nodes)
        messages = [self._train_message(m.metadata.dst_node_id, arrays, config, m.metadata.message_type) for m in sampled]
        self._track(server_round, len(messages)).start(label=f"round {server_round}: {len(messages)} customers training")
        self.run.log({"event": "round_started", "round": server_round, "nodes": len(messages)})
        return messages

    def _train_message(self, node: int, arrays: ArrayRecord, config: ConfigRecord, message_type: str) -> Message:
        edge = self.deployed_edges.get(self.partition_of_node.get(node, -1), self.original_edge)
        content = RecordDict({"tutor": arrays, "edge": ArrayRecord(edge), "config": config})
        self.train_bytes_down[node] = content_bytes(content)
        return Message(content=content, message_type=message_type, dst_node_id=node)

    def _learn_partitions(self, grid: Grid, nodes: list[int]) -> None:
        """Ask the sampled nodes not known yet who they are (a query message, answered at once by
        the ClientApp), before the train messages go out:
        - in this process's first round, always (the greeting): in a simulation the customers'
          Ray actors start (Python, torch, the ClientApp: a minute on 2 loaded cores) while they
          answer it, so that ``engine.round_timeout`` then times the customers' work, not their
          start-up. A node that does not answer in time is still sent its train message.
        - later, while some deployed edge model has no node: after a resume the node ids are new,
          and a customer with a deployed edge model must be sent its own.
        Otherwise a node's partition is learnt from its replies."""
        first, self.greeted = not self.greeted, True
        # partitions bound to nodes that are gone (a resumed run's nodes are new) count as unmatched
        unmatched = set(self.deployed_edges) - {p for n, p in self.partition_of_node.items() if n in self.connected}
        unknown = [node for node in nodes if node not in self.partition_of_node]
        if not unknown or not (first or unmatched):
            return
        started = time.monotonic()
        queries = [Message(RecordDict({"config": ConfigRecord({})}), message_type=f"{MessageType.QUERY}.partition", dst_node_id=node)
                   for node in unknown]
        for reply in grid.send_and_receive(queries, timeout=self.engine.round_timeout):
            try:
                partition_id = int(reply.content["metrics"]["partition-id"])
            except (KeyError, TypeError, ValueError):  # an error reply: the node is learnt from its train reply
                continue
            if 0 <= partition_id < len(self.population):
                try:
                    self._bind(reply.metadata.src_node_id, partition_id)
                except ValueError as exc:
                    log(WARNING, "partition query: %s", exc)
                    self.ledger.failure({"round": self.round_offset + 1, "node": reply.metadata.src_node_id, "reason": str(exc)})
        known = {p for n, p in self.partition_of_node.items() if n in self.connected}
        log(INFO, "asked %d new node(s) which customer they are: %d answered in %.0f s; %d of %d customers with a deployed "
            "edge model found", len(unknown), sum(node in self.partition_of_node for node in unknown), time.monotonic() - started,
            len(unmatched & known), len(unmatched))

    # ----------------------------------------------------------------------------- aggregation

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each reply through the manufacturer's step; accepted deltas merged into the shared tutor."""
        server_round += self.round_offset
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        failures = [{"round": server_round, "node": m.metadata.src_node_id, "reason": m.error.reason} for m in errors]
        answered = {m.metadata.src_node_id for m in replies}
        for node in self.sampled_nodes:
            if node not in answered:
                failures.append({"round": server_round, "node": node, "partition_id": self.partition_of_node.get(node),
                                 "reason": f"no reply within engine.round_timeout = {self.engine.round_timeout} s"})
        jobs, seen = [], set()
        for message in valid:
            try:
                job = self._read_reply(message, server_round)
                if job["customer"].partition_id in seen:
                    raise ValueError(f"a second reply for partition-id {job['customer'].partition_id} this round")
            except Exception as exc:  # noqa: BLE001 -- whatever a customer sends becomes a rejected reply, never a crash
                failures.append({"round": server_round, "node": message.metadata.src_node_id,
                                 "reason": f"malformed reply: {type(exc).__name__}: {exc}"})
                continue
            seen.add(job["customer"].partition_id)
            jobs.append(job)
        if self.tracker is not None:
            self.tracker.start(label=f"round {server_round}: the manufacturer's reviews")
        results = self._run_round_steps(server_round, jobs, failures)
        for failure in failures:
            log(WARNING, "round %d: customer on node %s failed: %s", server_round, failure["node"], failure["reason"])
            self.ledger.failure(failure)
        accepted, weights = [], []
        for job, result in zip(jobs, results):
            self.ledger.customer(server_round, job, result)
            if self.tracker is not None:
                self.tracker.finish("customer", label=f"round {server_round}, customer {job['customer'].partition_id} "
                                                      f"({job['customer'].name})")
            if result["verdict"]["accepted"]:
                accepted.append(job["delta"])
                weights.append(self._merge_weight(job["metrics"]))
            if self.config.simulation.deploy_mode in result["edges"]:  # accepted, and the edge passed its check
                self.deployed_edges[job["customer"].partition_id] = result["edges"][self.config.simulation.deploy_mode]

        if self.tracker is not None:  # the sampled customers that sent no usable reply
            for _ in range(len(self.sampled_nodes) - len(jobs)):
                self.tracker.finish("customer", label=f"round {server_round}, a customer without a usable reply")
        selected, selected_weights, selection = self._select(accepted, weights)
        merged_state, report = self._merge(selected, selected_weights)
        report["selection"] = selection
        report = {"round": server_round, "replies": len(valid), "failures": len(failures),
                  "accepted_customers": len(accepted), "shared_tutor_updated": merged_state is not None, "merge": report}
        self.ledger.round(report, merged_state)
        self.ledger.save_state(server_round)
        log(INFO, "round %d: %d replies, %d failures, %d accepted; shared tutor %s", server_round, len(valid), len(failures),
            len(accepted), "updated" if merged_state is not None else "unchanged")
        metrics = MetricRecord({"replies": len(valid), "failures": len(failures), "accepted": len(accepted),
                                "tutor-updated": int(merged_state is not None)})
        return (ArrayRecord(merged_state) if merged_state is not None else None), metrics

    def _select(self, deltas: list[dict], weights: list[float]) -> tuple[list[dict], list[float], dict]:
        """Krum / Multi-Krum (Flower's selection) over the accepted deltas, before merging."""
        sim = self.config.simulation
        if sim.select == "all" or len(deltas) <= 1:
            return deltas, weights, {"rule": sim.select, "kept": list(range(len(deltas)))}
        order = list(select_neck_head(self.tutor_state))  # the merge's key order, whatever order a customer sent
        contents = [RecordDict({"delta": ArrayRecord({k: delta[k] for k in order})}) for delta in deltas]
        keep = 1 if sim.select == "krum" else (sim.num_selected or max(1, len(deltas) - sim.num_malicious))
        chosen = select_multikrum(contents, sim.num_malicious, keep)
        kept = [i for i, content in enumerate(contents) if any(content is c for c in chosen)]
        log(INFO, "%s kept %d of %d accepted deltas: %s", sim.select, len(kept), len(deltas), kept)
        return [deltas[i] for i in kept], [weights[i] for i in kept], {"rule": sim.select, "kept": kept}

    def _merge(self, deltas: list[dict], weights: list[float]) -> tuple[dict | None, dict]:
        """The merge and the verification of the merged tutor: in a worker process with every core's
        threads (nothing else runs then), off the ServerApp's thread for the same reason as the steps."""
        if not deltas:
            return merge_round(self.config, self.tutor_state, deltas, weights)
        self.start_workers()
        threads = 0 if isinstance(self.pool, InlineExecutor) else self.cpus  # in this process: its threads stay as they are
        return self.pool.submit(merge_round, self.config, self.tutor_state, deltas, weights, threads).result()

    def _bind(self, node: int, partition_id: int) -> None:
        """A node is who it first said it was, for the run: ValueError when it claims another
        partition than before, or a partition bound to another node that is still connected. A
        partition whose node has gone (a resumed run's nodes are new) is bound to the new one."""
        bound = self.partition_of_node.get(node)
        if bound is not None and bound != partition_id:
            raise ValueError(f"node {node} answered as partition {bound} before; it cannot answer as partition {partition_id}")
        holder = next((n for n, p in self.partition_of_node.items() if p == partition_id and n != node), None)
        if holder is not None and holder in self.connected:
            raise ValueError(f"partition-id {partition_id} is bound to node {holder} for this run")
        self.partition_of_node.pop(holder, None)
        self.partition_of_node[node] = partition_id
        self.ledger.nodes = dict(self.partition_of_node)

    def _merge_weight(self, metrics: dict) -> float:
        """A delta's weight in ``merge = "mean"``: 1 (``merge_weights = "equal"``), or the
        customer's reported training images clipped to [1, ``max_examples``]."""
        sim = self.config.simulation
        if sim.merge_weights == "equal":
            return 1.0
        return float(min(max(metrics["num-examples"], 1), sim.max_examples))

    def _read_reply(self, message: Message, server_round: int | None = None) -> dict:
        """A train reply's job, or ValueError / TypeError / KeyError with the reason: metrics that
        are not finite numbers, a partition outside the population, a reply to another round, a
        payload larger than the tutor's neck and head before it is decoded."""
        metrics = dict(message.content["metrics"])
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"metric {name!r} = {value!r}: not a finite number")
        if "num-examples" in metrics and metrics["num-examples"] < 0:
            raise ValueError(f"num-examples = {metrics['num-examples']!r}: negative")
        partition_id = metrics["partition-id"]
        if partition_id != int(partition_id) or not 0 <= partition_id < len(self.population):
            raise ValueError(f"partition-id {partition_id!r} is not a partition of the population of {len(self.population)}")
        partition_id = int(partition_id)
        if server_round is not None and metrics.get("server-round") != server_round:
            raise ValueError(f"the reply answers round {metrics.get('server-round')!r}, this is round {server_round}")
        record = message.content["delta"]
        if not isinstance(record, ArrayRecord):
            raise TypeError(f"'delta' is a {type(record).__name__}, not an ArrayRecord")
        limit = min(self.neck_head_bytes + 4096 * len(select_neck_head(self.tutor_state)), self.config.simulation.max_uplink_bytes)
        if record.count_bytes() > limit:  # checked before a tensor is made of it
            raise ValueError(f"'delta' holds {record.count_bytes()} bytes, more than the {limit} the tutor's neck and head take")
        delta = record.to_torch_state_dict()
        if self.config.simulation.uplink_compression != "none":  # the payload's own encoding; ValueError names a bad key
            delta = decompress_delta(delta, select_neck_head(self.tutor_state))
        self._bind(message.metadata.src_node_id, partition_id)
        return {"customer": self.population[partition_id], "delta": delta, "metrics": metrics,
                "node": message.metadata.src_node_id, "edge": self.deployed_edges.get(partition_id, self.original_edge),
                "bytes_down": self.train_bytes_down.get(message.metadata.src_node_id, 0), "bytes_up": content_bytes(message.content)}

    def start_workers(self) -> None:
        """Start the manufacturer's worker processes (server_workers, or as many as CPUs and
        customers allow), once per run: they are kept for every round until :meth:`close`.
        In worker processes even when there is one: in the ServerApp's process the step's Python
        parts share the GIL with Flower's simulation loop (measured: 55 s a step there, 31 s alone).
        An executor given to the strategy is used as it is."""
        if self.pool is not None:
            return
        # each worker logs as this process does: its level, to stderr and to the run's log.txt
        log_file = str(self.run.log_path) if self.run.logging_to_file else None
        self.pool = ProcessPoolExecutor(max_workers=self.server_workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=start_worker, initargs=(current_level(), log_file, "diredi_sim.federation"))
        for _ in range(self.server_workers):  # the pool starts a process per waiting task: all of them, now
            self.pool.submit(int)

    def _track(self, server_round: int, sampled: int) -> Tracker:
        """The run's progress, opened at its first round: this round to the last, ``sampled``
        customers each (FedAvg samples as many every round); a customer's unit finishes when its
        round's results are in."""
        if self.tracker is None:
            rounds = [f"round {r}" for r in range(server_round, self.config.simulation.num_rounds + 1)]
            self.tracker = Tracker("federation", plan_units(rounds, [Unit("customer", f"customer {k + 1}") for k in range(sampled)]))
        return self.tracker

    def close(self) -> None:
        """Stop the manufacturer's worker processes (the run is over, or failed)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.pool is not None and self.own_pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _in_workers(self, step: Callable[..., dict], calls: dict[int, tuple], done: Callable[[int, dict], None]) -> dict[int, dict]:
        """``step(*args, threads)`` for each call (key -> args) on the executor, in parallel;
        ``done`` is told each result as it comes."""
        results: dict[int, dict] = {}
        if not calls:
            return results
        self.start_workers()
        try:
            threads = 0 if isinstance(self.pool, InlineExecutor) else self.server_threads
            futures = {self.pool.submit(step_then_release, step, *args, threads): key for key, args in calls.items()}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done(futures[future], results[futures[future]])
        except BrokenProcessPool:  # a worker died (killed, out of memory): the next round starts new ones
            self.close()
            raise
        return results

    def _exchange(self, server_round: int, kind: str, messages: dict[int, Message], jobs: list[dict],
                  failures: list[dict]) -> dict[int, Message]:
        """Send one message per job (job index -> message) and wait up to the round timeout;
        returns job index -> reply. A customer that does not answer, or answers with an error,
        is a failure of this exchange (recorded; its round goes on without that part)."""
        if not messages:
            return {}
        for i, message in messages.items():
            jobs[i]["bytes"][f"{kind}.down"] = content_bytes(message.content)
        node_to_job = {jobs[i]["node"]: i for i in messages}
        replies = {}
        for reply in self.grid.send_and_receive(list(messages.values()), timeout=self.engine.round_timeout):
            i = node_to_job.get(reply.metadata.src_node_id)
            if i is None:
                continue
            if reply.has_error():
                failures.append(self._failure(server_round, jobs[i], f"{kind}: {reply.error.reason}"))
                continue
            answered = dict(reply.content["metrics"]).get("server-round") if "metrics" in reply.content else None
            if answered != server_round:
                failures.append(self._failure(server_round, jobs[i], f"{kind}: the reply answers round {answered!r}, "
                                                                     f"this is round {server_round}"))
                continue
            jobs[i]["bytes"][f"{kind}.up"] = content_bytes(reply.content)
            replies[i] = reply
        for i in set(messages) - set(replies):
            if not any(f.get("node") == jobs[i]["node"] and f["reason"].startswith(kind) for f in failures):
                failures.append(self._failure(server_round, jobs[i],
                                              f"{kind}: no reply within engine.round_timeout = {self.engine.round_timeout} s"))
        return replies

    def _message(self, kind: str, node: int, records: dict) -> Message:
        return Message(RecordDict({**records, "config": self.round_config}), message_type=kind, dst_node_id=node)

    def _run_round_steps(self, server_round: int, jobs: list[dict], failures: list[dict]) -> list[dict]:
        """After the deltas came up: the manufacturer's review per customer (a malformed delta is
        rejected at once), the customers' Distill C public+private and its check, the customers'
        evaluation; one combined result per job (:func:`combine_round`). ``failures`` receives
        what went wrong in each exchange."""
        results: list[dict | None] = [None] * len(jobs)
        for i, job in enumerate(jobs):
            job["bytes"] = {"train.down": job["bytes_down"], "train.up": job["bytes_up"]}
            problems = reply_problems(job["delta"], self.tutor_state)
            if problems:
                log(WARNING, "customer %d (%s): malformed delta rejected: %s", job["customer"].partition_id, job["customer"].name,
                    "; ".join(problems))
                results[i] = {"verdict": {"accepted": False, "reasons": problems, "delta_norm": math.nan}, "rows": [],
                              "edges": {}, "stages": [], "seconds": 0.0}
        reviews = self._reviews(jobs, [i for i, result in enumerate(results) if result is None])
        edges = self._customer_edges(server_round, jobs, reviews, failures)
        for i, rows in self._customer_rows(server_round, jobs, reviews, edges, failures).items():
            results[i] = combine_round(self.config, jobs[i]["customer"], reviews[i], rows,
                                       {k: v for k, v in edges[i].items() if "verdict" in v})
        return results

    def _failure(self, server_round: int, job: dict, reason: str) -> dict:
        return {"round": server_round, "node": job["node"], "partition_id": job["customer"].partition_id, "reason": reason}

    def _reviews(self, jobs: list[dict], indices: list[int]) -> dict[int, dict]:
        """The manufacturer's review of each job's delta, in the workers (job index -> review)."""
        def reviewed(i: int, review: dict) -> None:
            verdict = review["verdict"]
            log(INFO, "customer %d (%s): %s; manufacturer's review %.0f s", jobs[i]["customer"].partition_id,
                jobs[i]["customer"].name, "accepted" if verdict["accepted"] else "rejected: " + "; ".join(verdict["reasons"]),
                review["seconds"])

        if indices:
            log(INFO, "manufacturer: %d customers' reviews in %d processes (%d torch threads each)", len(indices),
                min(self.server_workers, len(indices)), self.server_threads)
        calls = {i: (self.config, jobs[i]["customer"], self.tutor_state, jobs[i]["edge"], jobs[i]["delta"]) for i in indices}
        return self._in_workers(self.review_step, calls, reviewed)

    def _customer_edges(self, server_round: int, jobs: list[dict], reviews: dict[int, dict],
                        failures: list[dict]) -> dict[int, dict[str, dict]]:
        """Distill C public+private at the customers (``train.distill_c``), each edge they send
        up checked here (job index -> row key -> {state, verdict, ...})."""
        distilling = [i for i in reviews if "public+private" in self.config.pipeline.distill_c_modes
                      and (reviews[i]["verdict"]["accepted"] or self.config.simulation.distill_rejected)]
        messages = {i: self._message(f"{MessageType.TRAIN}.distill_c", jobs[i]["node"],
                                     {"tutor": ArrayRecord(reviews[i]["tutor_prime"]), "edge": ArrayRecord(jobs[i]["edge"])})
                    for i in distilling}
        edges: dict[int, dict[str, dict]] = {i: {} for i in reviews}
        checks = {}
        for i, reply in self._exchange(server_round, "distill_c", messages, jobs, failures).items():
            try:
                made = read_edges(reply, jobs[i]["edge"], self.config.pipeline)
                jobs[i]["distill_c_metrics"] = dict(reply.content["metrics"])
            except (KeyError, TypeError, ValueError) as exc:
                failures.append(self._failure(server_round, jobs[i], f"distill_c: malformed reply: {exc}"))
                continue
            for key, state in made.items():
                edges[i][key] = {"state": state}
                checks[(i, key)] = (self.config, jobs[i]["customer"], jobs[i]["edge"], state)
        for (i, key), check in self._in_workers(self.edge_step, checks, lambda key, result: None).items():
            edges[i][key].update(check)
            if not check["verdict"]["accepted"]:
                log(WARNING, "customer %d: its Distill C edge (%s) fails the manufacturer's check: %s", jobs[i]["customer"].partition_id,
                    key, "; ".join(check["verdict"]["reasons"]))
        return edges

    def _customer_rows(self, server_round: int, jobs: list[dict], reviews: dict[int, dict], edges: dict[int, dict[str, dict]],
                       failures: list[dict]) -> dict[int, dict[str, dict]]:
        """The customers' halves of the table rows (``evaluate``: every model of the round on
        their own test images); job index -> row key -> measures ({} when the reply failed)."""
        messages = {}
        for i, review in reviews.items():
            models = {**evaluation_models(self.tutor_state, jobs[i]["edge"], review), **{k: e["state"] for k, e in edges[i].items()}}
            messages[i] = self._message(MessageType.EVALUATE, jobs[i]["node"], {key: ArrayRecord(state) for key, state in models.items()})
        evaluated = self._exchange(server_round, "evaluate", messages, jobs, failures)
        rows = {}
        for i in reviews:
            try:
                rows[i] = rows_from_metrics(dict(evaluated[i].content["metrics"])) if i in evaluated else {}
            except (KeyError, TypeError, ValueError) as exc:
                failures.append(self._failure(server_round, jobs[i], f"evaluate: malformed reply: {exc}"))
                rows[i] = {}
        return rows



__all__ = ["DiReDiStrategy", "InlineExecutor", "SUMMARY_COLUMNS", "STATE_FORMAT"]  # the last two: server.ledger's
