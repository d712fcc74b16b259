"""Headless Chromium for report tests: load a page, probe it from inside, screenshot it."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

_PROBE = """<script>
window.__problems = [];
window.addEventListener('error', (e) => {
  const t = e.target;
  window.__problems.push(t && t.tagName ? 'failed to load ' + t.tagName : 'error: ' + e.message);
}, true);
window.addEventListener('unhandledrejection', (e) => {
  window.__problems.push('unhandled rejection: ' + e.reason);
});
for (const level of ['error', 'warn']) {
  const original = console[level];
  console[level] = function (...args) {
    window.__problems.push('console.' + level + ': ' + args.join(' '));
    original.apply(console, args);
  };
}
document.addEventListener('securitypolicyviolation', (e) => {
  window.__problems.push('blocked request: ' + e.blockedURI);
});
function record(name, value) {
  document.body.setAttribute('data-' + name, JSON.stringify(value));
}
window.addEventListener('load', () => {
  try {
    /*ACTIONS*/
  } catch (err) {
    window.__problems.push('probe actions failed: ' + err);
  }
  const images = Array.from(document.images);
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt);
  // every request the page made that did not read one of its own files
  const requests = performance.getEntriesByType('resource').map((r) => r.name)
    .filter((u) => !u.startsWith('file:'));
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-broken', JSON.stringify(broken));
  document.body.setAttribute('data-problems', JSON.stringify(window.__problems));
  document.body.setAttribute('data-requests', JSON.stringify(requests));
  document.body.setAttribute('data-probe', 'done');
});
</script>"""


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def chromium_run(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    base = [
        chromium() or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=180, check=False)


def probe_page(page: Path, tmp: Path, actions: str = "") -> tuple[dict[str, str], str]:
    """Load a copy of ``page`` with a probe script; return the body's probe attributes and DOM.

    The probe records load errors, script errors, ``console.error``/``warn`` calls, blocked
    requests, requests to anything but a file (``data-requests``) and undecoded images
    (``naturalWidth``). ``actions`` is JavaScript run once the page has loaded (after the page's
    own scripts), before the probe reads the page; ``record(name, value)`` stores ``value`` as
    JSON in the body's ``data-<name>``. The probe sits before the page's
    Content-Security-Policy, which applies only to what follows it.
    """
    probe = page.with_name("probe.html")
    script = _PROBE.replace("/*ACTIONS*/", actions)
    probe.write_text(
        page.read_text(encoding="utf-8").replace("<head>", "<head>" + script, 1), encoding="utf-8"
    )
    dom = chromium_run(
        ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp / "profile-dom"
    )
    probe.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', body.group(1))}
    assert attrs.get("data-probe") == "done", attrs
    return attrs, dom.stdout


def screenshot(page: Path, out: Path, tmp: Path, size: str = "1280,2400") -> Path:
    """Take a PNG screenshot of ``page``."""
    taken = chromium_run(
        [f"--window-size={size}", f"--screenshot={out}", page.as_uri()], tmp / "profile-shot"
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert out.exists()
    return out
