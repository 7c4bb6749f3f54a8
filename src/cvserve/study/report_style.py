"""The study report's style sheet: one self-contained HTML page, no external assets."""

__all__ = ["CSS"]

CSS = """
:root { color-scheme: light; --ink: #1d232a; --muted: #5b6570; --line: #d8dde3;
  --accent: #1f5fa8; --sim: #8a4b00; --sim-bg: #fff3e0; --bad: #a12622; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 20px 48px; }
header, section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 20px 24px; margin-bottom: 24px; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.3rem; margin: 0 0 12px; }
h3 { font-size: 1rem; margin: 18px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
nav ol { margin: 12px 0 0; padding-left: 20px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 0.85rem; }
pre { background: #f1f3f5; border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 12px; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
.badge { display: inline-block; font-size: 0.7rem; font-weight: 700; letter-spacing: 0.04em;
  padding: 1px 6px; border-radius: 4px; vertical-align: middle; margin-left: 6px; }
.badge.sim { background: var(--sim-bg); color: var(--sim); border: 1px solid var(--sim); }
.badge.skipped, .badge.failed, .badge.notrun { background: #fbeaea; color: var(--bad);
  border: 1px solid var(--bad); }
.simulated-banner { background: var(--sim-bg); color: var(--sim); border: 1px solid var(--sim);
  border-left-width: 6px; border-radius: 6px; padding: 8px 12px; margin: 0 0 14px;
  font-weight: 600; }
.findings { border-left: 4px solid var(--accent); background: #eef4fb; border-radius: 6px;
  padding: 10px 16px; margin: 0 0 16px; }
.findings p { margin: 6px 0; font-size: 1.05rem; font-weight: 500; }
.none { color: var(--muted); font-style: italic; }
.evidence { display: grid; grid-template-columns: minmax(0, 1fr) 250px; gap: 20px;
  align-items: start; }
@media (max-width: 900px) { .evidence { grid-template-columns: 1fr; } }
figure { margin: 0 0 16px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line);
  border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.85rem; margin-top: 4px; }
aside.paper { background: #fafafa; border: 1px solid var(--line); border-radius: 6px;
  padding: 10px 14px; font-size: 0.9rem; }
aside.paper h3 { margin-top: 0; }
aside.paper .figure { font-weight: 600; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 4px 0 12px; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; white-space: nowrap; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left;
  white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.reason { white-space: normal; color: var(--bad); }
table.derived td { white-space: normal; overflow-wrap: anywhere; }
tr.skipped td, tr.failed td { background: #fdf6f6; }
.error { color: var(--bad); }
.small { color: var(--muted); font-size: 0.8rem; }
footer { color: var(--muted); font-size: 0.8rem; text-align: center; }
"""
