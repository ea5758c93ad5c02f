"""Running an experiment on Ray: each step as soon as the steps it names are done, independent steps at once.

Every Ray touchpoint of experiments is here. A step that is not done runs as one Ray task (``_run_step``)
that holds no CPU itself: the Ray Data tasks and actors and the Ray Train workers it starts ask for theirs
(a task holding a CPU could starve its own actors on a small machine). A failed step's descendants are
skipped; the others go on.

A lease (``STEP-<hash>.lease`` beside the output, renewed every ``HEARTBEAT_S``) stops a second invocation
from running the same step at the same time: it waits for the first one's output instead. A lease not
renewed for ``STALE_S`` (its holder died) is taken over, and the step goes on from what it left.
Each invocation writes ``STORAGE/NAME/experiment.json``: the provenance record (``record.py``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from minimind import storage
from minimind.experiment.graph import DONE_FILE, PlannedStep, is_done, map_strings, resolved_config
from minimind.experiment.spec import Experiment

HEARTBEAT_S = 10.0
STALE_S = 60.0


@dataclass
class StepOutcome:
    status: str
    """cached | ran | failed | skipped (this invocation)."""
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)
    error: str | None = None


class Lease:
    """A step's lease: a file naming its holder and when it last renewed it.

    Taking one that does not exist is an exclusive create on a local or shared filesystem; object storage
    has no exclusive create, so there the holder writes, waits, and reads back that it is still the holder.
    """

    def __init__(self, output: str, owner: str):
        self.path = output.rstrip("/") + ".lease"
        self.owner = owner

    def holder(self) -> tuple[str, float] | None:
        try:
            record = json.loads(storage.read_text(self.path))
        except (OSError, ValueError):
            return None
        return record.get("owner", ""), float(record.get("renewed", 0))

    def try_take(self) -> bool:
        held = self.holder()
        if held is not None and held[0] != self.owner and time.time() - held[1] < STALE_S and _alive(held[0]):
            return False
        body = json.dumps({"owner": self.owner, "renewed": time.time(), "host": socket.gethostname()})
        if held is None and not storage.is_uri(self.path):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as handle:
                handle.write(body)
            return True
        storage.write_text(self.path, body)  # a stale lease taken over, or object storage
        time.sleep(1.0)
        held = self.holder()
        return held is not None and held[0] == self.owner

    def renew(self) -> bool:
        """Renew the lease if this invocation still holds it (False: another took it over as stale, and is
        not overwritten)."""
        held = self.holder()
        if held is not None and held[0] != self.owner:
            return False
        storage.write_text(self.path, json.dumps({"owner": self.owner, "renewed": time.time(),
                                                  "host": socket.gethostname()}))  # fmt: skip
        return True

    def release(self) -> None:
        held = self.holder()
        if held is not None and held[0] == self.owner:
            if storage.is_uri(self.path):
                storage.filesystem(self.path)[0].delete_file(storage.filesystem(self.path)[1])
            else:
                Path(self.path).unlink(missing_ok=True)


def renew_leases(leases: list[Lease], lost: list[Lease]) -> None:
    """One heartbeat: renew each lease; one another run took over goes to ``lost``. A renewal that fails (a
    storage hiccup) is tried again at the next beat, well before the lease is stale, instead of ending the
    heartbeat (another run would then take every step over after ``STALE_S``)."""
    for lease in leases:
        try:
            renewed = lease.renew()
        except Exception as error:
            print(f"[experiment] warning: could not renew {lease.path} ({error}); trying again", flush=True)
            continue
        if not renewed and lease not in lost:
            lost.append(lease)
            print(f"[experiment] warning: another run took over {lease.path} (this one missed renewing "
                  f"it for {STALE_S:.0f} s); both may now run that step", flush=True)  # fmt: skip


def _alive(owner: str) -> bool:
    """Whether a lease's holder may still be running: not when it was a process of this machine that has
    ended (a run killed and started again takes its steps back at once, not after ``STALE_S``)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_experiment(
    experiment: Experiment, planned: dict[str, PlannedStep], force: set[str], only: set[str] | None
) -> dict[str, StepOutcome]:
    """Run what is not done (and ``force``d steps again); ``only``: just these steps (their parents must be
    done). Returns each step's outcome for this invocation."""
    import ray

    run_step = ray.remote(_run_step)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    outcomes: dict[str, StepOutcome] = {}
    pending = [name for name in experiment.order() if only is None or name in only]
    for name in experiment.order():
        if name not in pending:
            outcomes[name] = StepOutcome("cached" if planned[name].done else "skipped")
    running: dict = {}  # Ray ref -> (step name, lease, started)
    waiting_on_others: dict[str, Lease] = {}  # steps another invocation holds
    leases: list[Lease] = []
    lost: list[Lease] = []
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_S):
            renew_leases(list(leases), lost)

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        while pending or running:
            for name in list(pending):
                entry = planned[name]
                parents = entry.step.parent_names
                if any(outcomes.get(p) and outcomes[p].status in ("failed", "skipped") for p in parents):
                    outcomes[name] = StepOutcome("skipped", error="a step it needs did not finish")
                    pending.remove(name)
                    print(f"[experiment] {name}: skipped (a step it needs did not finish)", flush=True)
                    continue
                if not all(p in outcomes and outcomes[p].status in ("cached", "ran") for p in parents):
                    continue
                if (entry.done or is_done(entry.output, entry.hash)) and name not in force:
                    outcomes[name] = StepOutcome("cached")
                    pending.remove(name)
                    print(f"[experiment] {name}: cached ({entry.output})", flush=True)
                    continue
                lease = waiting_on_others.get(name) or Lease(entry.output, owner)
                if not lease.try_take():
                    if name not in waiting_on_others:
                        print(f"[experiment] {name}: another run holds it ({lease.path}); waiting", flush=True)
                    waiting_on_others[name] = lease
                    continue
                waiting_on_others.pop(name, None)
                if name not in force and is_done(entry.output, entry.hash):  # finished by the run that held it
                    lease.release()
                    outcomes[name] = StepOutcome("cached")
                    pending.remove(name)
                    print(f"[experiment] {name}: cached ({entry.output}, finished by another run)", flush=True)
                    continue
                if name in force and is_done(entry.output, entry.hash):
                    storage.delete_dir(entry.output)
                    force.discard(name)  # once, even if a second run of this invocation would find it
                leases.append(lease)
                pending.remove(name)
                config = _for_workers(resolved_config(planned, name), entry.step.inputs)
                kind = entry.step.kind
                print(f"[experiment] {name}: running {kind} -> {entry.output}", flush=True)
                ref = run_step.options(num_cpus=0, name=f"step:{name}").remote(
                    kind, config, entry.output, entry.hash, name
                )
                running[ref] = (name, lease, time.time())
            if not running:
                if pending:
                    time.sleep(2.0)  # steps held by another invocation
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
            for ref in ready:
                name, lease, started = running.pop(ref)
                try:
                    summary = ray.get(ref)
                    outcomes[name] = StepOutcome("ran", time.time() - started, summary)
                    print(f"[experiment] {name}: done in {time.time() - started:.0f} s", flush=True)
                except Exception as error:  # noqa: BLE001 (a step's failure is reported; the others go on)
                    text = str(error).strip().splitlines()
                    outcomes[name] = StepOutcome("failed", time.time() - started, error=text[-1] if text else "")
                    print(f"[experiment] {name}: FAILED: {outcomes[name].error}", flush=True)
                leases.remove(lease)
                lease.release()
    finally:
        stop.set()
        for lease in leases:
            lease.release()
    return outcomes


def link_outputs(experiment: Experiment, planned: dict[str, PlannedStep], outcomes: dict[str, StepOutcome]) -> None:
    """On local storage, point ``STORAGE/NAME/STEP`` at each done step's output: a path that stays put while
    the hashed outputs change (``minimind chat --checkpoint runs/experiments/sample/sft``). Object storage has
    no links; ``experiment.json`` names the outputs there."""
    if storage.is_uri(experiment.root):
        return
    for name, outcome in outcomes.items():
        if outcome.status not in ("ran", "cached"):
            continue
        link = Path(experiment.root) / name
        if link.exists() and not link.is_symlink():
            print(f"[experiment] {name}: {link} is not a link; not pointing it at {planned[name].output}")
            continue
        staged = link.with_name(f".{name}.{uuid.uuid4().hex[:8]}")
        staged.symlink_to(Path(planned[name].output).name)  # relative: the tree may be moved or mounted elsewhere
        staged.replace(link)  # atomic: a concurrent invocation sees the old link or the new one


def _for_workers(config: dict, inputs: list[str]) -> dict:
    """The config with the step's input paths made absolute: its task does not run in this process's
    directory. Under ``ray job submit --working-dir`` every task runs in its own copy of that directory,
    where relative paths already resolve (and absolute ones of the driver's copy might not)."""
    import ray

    if ray.get_runtime_context().runtime_env.get("working_dir"):
        return config
    local = {path: str(Path(path).resolve()) for path in inputs if not storage.is_uri(path)}
    return map_strings(config, lambda value: local.get(value, value))


def _run_step(kind: str, config: dict, output: str, digest: str, name: str) -> dict:
    """One step, in its Ray task: run it, then mark its output done (``step.json``, written last)."""
    from minimind.experiment.steps import RUNNERS

    started = time.time()
    summary = {**RUNNERS[kind](config), "seconds": round(time.time() - started, 1)}
    marker = {"step": name, "kind": kind, "hash": digest, "finished_at": time.time(), "summary": summary}
    storage.write_text(storage.join(output, DONE_FILE), json.dumps(marker, indent=1, default=str))
    return summary
