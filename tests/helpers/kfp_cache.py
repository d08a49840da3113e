"""KFP's cache decisions replayed on a compiled IR (a stand-in for the backend, which cannot run here).

As backend/src/v2/cacheutils/cache.go (2.14-2.17) keys a task: its input parameter values, the names of its
input artifacts, its output specs, image and command. A cached task whose key was seen reuses that
execution's outputs (the same artifacts, so the same names downstream); any other execution makes new
artifacts. ``replay`` walks the IR's DAG (for-loops and collected outputs included) once per pipeline run,
with the uncached tasks' output parameters supplied by the test, and reports which tasks hit.
"""

from __future__ import annotations

import itertools
import json


class CacheReplay:
    def __init__(self, ir: dict):
        self.ir = ir
        self.store: dict[str, dict] = {}  # fingerprint -> outputs of the execution that made it
        self._names = itertools.count(1)

    def replay(self, parameters: dict, uncached_outputs: dict[str, dict], cached_outputs: dict[str, dict]) -> list:
        """One pipeline run: [(task name, "hit" | "ran")] in execution order. ``uncached_outputs`` and
        ``cached_outputs`` give each task's output parameters when it runs (by task name)."""
        self.events: list[tuple[str, str]] = []
        self.outputs_when_run = {**uncached_outputs, **cached_outputs}
        self._dag(self.ir["root"], dict(parameters), {})
        return self.events

    def _dag(self, component: dict, params: dict, artifacts: dict) -> dict:
        done: dict[str, dict] = {}
        tasks = component["dag"]["tasks"]
        pending = dict(tasks)
        while pending:
            for name, task in list(pending.items()):
                if all(d in done for d in task.get("dependentTasks", [])):
                    done[name] = self._task(name, task, params, artifacts, done)
                    del pending[name]
        outputs = {"artifacts": {}}
        for key, spec in component["dag"].get("outputs", {}).get("artifacts", {}).items():
            outputs["artifacts"][key] = [done[s["producerSubtask"]]["artifacts"][s["outputArtifactKey"]]
                                         for s in spec["artifactSelectors"]]
        return outputs

    def _inputs(self, task: dict, params: dict, artifacts: dict, done: dict) -> tuple[dict, dict]:
        p, a = {}, {}
        for key, src in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in src:
                p[key] = params[src["componentInputParameter"]]
            elif "taskOutputParameter" in src:
                out = src["taskOutputParameter"]
                p[key] = done[out["producerTask"]]["parameters"][out["outputParameterKey"]]
            else:
                p[key] = src["runtimeValue"]["constant"]
        for key, src in task.get("inputs", {}).get("artifacts", {}).items():
            if "componentInputArtifact" in src:
                a[key] = artifacts[src["componentInputArtifact"]]
            else:
                out = src["taskOutputArtifact"]
                a[key] = done[out["producerTask"]]["artifacts"][out["outputArtifactKey"]]
        return p, a

    def _task(self, name: str, task: dict, params: dict, artifacts: dict, done: dict) -> dict:
        p, a = self._inputs(task, params, artifacts, done)
        component = self.ir["components"][task["componentRef"]["name"]]
        if "dag" in component:
            iterator = task.get("parameterIterator")
            if iterator is None:  # a condition: these replays take its branch
                return self._dag(component, p, a)
            collected: dict[str, list] = {}
            for item in p[iterator["items"]["inputParameter"]]:
                out = self._dag(component, {**p, iterator["itemInput"]: item}, a)
                for key, names in out["artifacts"].items():
                    collected.setdefault(key, []).extend(names)
            return {"artifacts": collected, "parameters": {}}
        executor = self.ir["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        fingerprint = json.dumps({"parameters": p, "artifacts": a, "image": executor["image"],
                                  "command": executor["command"], "args": executor.get("args"),
                                  "component": task["componentRef"]["name"]}, sort_keys=True)
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        if cached and fingerprint in self.store:
            self.events.append((name, "hit"))
            return self.store[fingerprint]
        self.events.append((name, "ran"))
        serial = next(self._names)
        declared = component.get("outputDefinitions", {})
        # Output parameters not given by the test: a value of this execution alone, as a run-scoped one would be.
        given = self.outputs_when_run.get(name, {})
        produced = {"artifacts": {key: f"artifact-{serial}-{key}" for key in declared.get("artifacts", {})},
                    "parameters": {key: given.get(key, f"value-{serial}-{key}")
                                   for key in declared.get("parameters", {})}}
        if cached:
            self.store[fingerprint] = produced
        return produced
