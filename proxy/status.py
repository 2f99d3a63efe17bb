"""The status page at ``/-/``, for a person in a dev stack asking "why does API Gateway answer 401?": each route
and its credential (grant, token kind, the token's claims, never the token), time to expiry and next refresh, the
last refresh's outcome and its explanation, the token store, and the last requests, updating every 2 s.

Three fixed assets (the page, its script, its style: no external ones, no inline script or style, a strict
Content-Security-Policy) and ``/-/status.json``, which the script renders with ``textContent`` only, so every value
is escaped by construction. Served to trusted callers only (this machine, or the caller token), never on the
metrics listener.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from proxy.request import OWN_ROUTE, RequestRecord
from proxy.types import Scope

# Requests the page lists, newest first.
RECENT_REQUESTS = 100
# The token claims the page shows: what tells a credential from another, never one that could be replayed.
SHOWN_CLAIMS = ("iss", "aud", "client_id", "scope", "token_use", "exp")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The paths of the page and what it loads; any other /-/ path is not the page's.
PAGE_PATHS = frozenset({"/-/", "/-/status.json", "/-/status.js", "/-/status.css"})


class RecentRequests:
    """The last ``RECENT_REQUESTS`` forwarded or refused requests (the sidecar's own ``/-/`` ones left out): kept as
    the request's record and a few scope values, turned into rows only when the page asks."""

    def __init__(self, size: int = RECENT_REQUESTS) -> None:
        self._rows: deque[tuple[float, str, bytes, RequestRecord, float]] = deque(maxlen=size)

    def note(self, scope: Scope, record: RequestRecord, seconds: float) -> None:
        if record.route != OWN_ROUTE:
            self._rows.append((time.time(), scope["method"], scope.get("raw_path") or b"", record, seconds))

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "time": time.strftime("%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z",
                "method": method,
                "path": raw_path.decode("latin-1")[:300],  # never the query string
                "status": record.status,
                "source": record.source,
                "error": record.error or None,
                "duration_ms": round(seconds * 1000, 2),
                "request_id": record.request_id,
                "upstream_request_id": record.upstream_request_id or None,
                "route": record.route,
            }
            for when, method, raw_path, record, seconds in reversed(self._rows)
        ]


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cognito-sidecar status</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/-/status.css">
<script src="/-/status.js" defer></script>
</head>
<body>
<header><h1>cognito-sidecar</h1><p id="summary">loading&hellip;</p></header>
<main>
<section><h2>Routes and credentials</h2><div id="routes"></div></section>
<section><h2>Last requests</h2>
<table id="requests"><thead><tr><th>time (UTC)</th><th>method</th><th>path</th><th>status</th><th>source</th>
<th>error</th><th>ms</th><th>route</th><th>request id</th><th>API Gateway request id</th></tr></thead>
<tbody></tbody></table></section>
</main>
<footer><p>Updated every 2 s from <a href="/-/status.json">/-/status.json</a>. Tokens are never shown;
secrets never leave the sidecar. Metrics: <a href="/-/metrics">/-/metrics</a>,
readiness: <a href="/-/readyz">/-/readyz</a>.</p></footer>
</body>
</html>
"""

SCRIPT = """"use strict";
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function seconds(value) {
  if (value === null || value === undefined) return "-";
  const s = Math.round(value);
  return s >= 120 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : s + " s";
}
function pairs(rows) {
  const list = el("dl");
  for (const [name, value] of rows) {
    list.appendChild(el("dt", name));
    list.appendChild(el("dd", value === null || value === undefined || value === "" ? "-" : value));
  }
  return list;
}
function route(data) {
  const box = el("article", null, data.credential.state === "ready" ? "route ok" : "route trouble");
  box.appendChild(el("h3", data.prefix + " \\u2192 " + data.upstream));
  const c = data.credential;
  box.appendChild(pairs([
    ["state", c.state], ["grant", c.grant], ["token sent", data.token + " in " + data.header],
    ["client id", c.client_id], ["token endpoint", c.token_url],
    ["expires in", seconds(c.expires_in)], ["next refresh in", seconds(c.next_refresh_in)],
    ["last refresh", c.last_outcome], ["token store", c.store],
  ]));
  if (c.detail) box.appendChild(el("p", c.detail, "explanation"));
  const claims = Object.entries(c.claims || {});
  if (claims.length) {
    box.appendChild(el("h4", "claims of the token in hand"));
    box.appendChild(pairs(claims.map(([k, v]) => [k, Array.isArray(v) ? v.join(" ") : v])));
  }
  return box;
}
function render(data) {
  document.getElementById("summary").textContent =
    "version " + data.version + ", " + data.routes.length + " route(s), " + (data.ready ? "ready" : "not ready") +
    (data.warnings.length ? " \\u2014 " + data.warnings.join(" ") : "");
  const routes = document.getElementById("routes");
  routes.replaceChildren(...data.routes.map(route));
  const body = document.querySelector("#requests tbody");
  body.replaceChildren(...data.requests.map((r) => {
    const row = el("tr", null, r.status >= 400 || r.status === 0 ? "failed" : "");
    for (const v of [r.time, r.method, r.path, r.status, r.source, r.error || "", r.duration_ms, r.route,
                     r.request_id, r.upstream_request_id || ""]) row.appendChild(el("td", v));
    return row;
  }));
}
async function refresh() {
  try {
    const answer = await fetch("/-/status.json", {cache: "no-store"});
    if (answer.ok) render(await answer.json());
  } catch (error) {
    document.getElementById("summary").textContent = "the sidecar does not answer (" + error + ")";
  }
}
refresh();
setInterval(refresh, 2000);
"""

STYLE = """body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2430; background: #fafbfc; }
h1 { margin: 0 0 .2rem; font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.5rem; }
h3 { margin: 0 0 .5rem; font-size: 1rem; font-family: ui-monospace, monospace; } h4 { margin: .6rem 0 .2rem; }
.route { border: 1px solid #d0d7de; border-left: 6px solid #2da44e; border-radius: 6px; padding: .8rem 1rem;
  margin: .6rem 0; background: #fff; }
.route.trouble { border-left-color: #cf222e; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15rem 1rem; margin: 0; }
dt { color: #57606a; } dd { margin: 0; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.explanation { background: #fff1f0; border-radius: 4px; padding: .5rem; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; }
th, td { border-bottom: 1px solid #eaeef2; padding: .25rem .5rem; text-align: left; white-space: nowrap; }
td { font-family: ui-monospace, monospace; } tr.failed td { color: #cf222e; }
footer { margin-top: 1.5rem; color: #57606a; font-size: 12px; }
"""


__all__ = ["CSP", "PAGE", "PAGE_PATHS", "SCRIPT", "SHOWN_CLAIMS", "STYLE", "RecentRequests"]
