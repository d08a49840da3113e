"""Whether Argo retries a node, as its controller decides (a stand-in: no Argo runs here).

Read from argo-workflows v3.7.3 (KFP 2.16) and v4.0.5 (KFP 2.17), workflow/controller/operator.go
``processNodeRetries``: the retry policy picks the phases (Always: Failed and Error; OnFailure, the default
without a policy or expression: Failed; OnError: Error), the expression is a further AND over ``lastRetry``
(status = the node's phase, message = its message; a DAG node that failed carries no message, dag.go), and a
limit of 0 retries nothing. ``templateDefaults`` merge into a template field by field, the template's own
fields winning (the controller's strategic merge; RetryStrategy has no patch strategy).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

# (node phase, node message) of each case, as the controller records it
CASES = {
    "pod lost with its node": ("Error", "pod deleted"),
    "graceful pre-emption (SIGTERM)": ("Failed", "Pod was terminated in response to imminent node shutdown."),
    "OOM kill": ("Failed", "OOMKilled (exit code 137)"),
    "deterministic failure (exit 1/2)": ("Failed", "Error (exit code 1)"),
}
DAG_CASES = {"a DAG whose child failed": ("Failed", ""), "a DAG whose child errored": ("Error", "")}


def merged(defaults: dict, own: dict) -> dict:
    return {**defaults, **own}


def evaluate(expression: str, phase: str, message: str) -> bool:
    """The few operators the shipped expression uses (==, !=, &&, ||), over lastRetry.status and .message."""
    if not re.fullmatch(r"[\w.' !=&|]+", expression):
        raise ValueError(f"expression outside what this stand-in evaluates: {expression!r}")
    python = expression.replace("&&", " and ").replace("||", " or ")
    return bool(eval(python, {"__builtins__": {}}, {"lastRetry": SimpleNamespace(status=phase, message=message)}))


def retries(strategy: dict | None, phase: str, message: str) -> bool:
    if not strategy or int(strategy.get("limit", 0) or 0) <= 0:  # no strategy, or a limit of 0
        return False
    policy = strategy.get("retryPolicy") or ("Always" if strategy.get("expression") else "OnFailure")
    by_phase = {"Always": phase in ("Failed", "Error"), "OnFailure": phase == "Failed", "OnError": phase == "Error"}
    if not by_phase[policy]:
        return False
    return evaluate(strategy["expression"], phase, message) if strategy.get("expression") else True
