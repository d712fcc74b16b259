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
document.addEventListener('securitypolicyviolation', (e) => {
  window.__problems.push('blocked request: ' + e.blockedURI);
});
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt);
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-broken', JSON.stringify(broken));
  document.body.setAttribute('data-problems', JSON.stringify(window.__problems));
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


def probe_page(page: Path, tmp: Path) -> tuple[dict[str, str], str]:
    """Load a copy of ``page`` with a probe script; return the body's probe attributes and DOM.

    The probe records load errors, blocked requests and undecoded images (``naturalWidth``).
    """
    probe = page.with_name("probe.html")
    probe.write_text(
        page.read_text(encoding="utf-8").replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8"
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
