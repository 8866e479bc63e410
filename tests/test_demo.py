"""The demo (the README's main command) end to end on the tiny model: two fleets, two rounds
with a weight update between them, the summary and the timeline."""

from __future__ import annotations

import argparse
import json

from efficientrollout.pipeline.demo import add_demo_args, run_demo


def test_the_demo_serves_every_round_at_its_version_and_accounts_for_every_wave(tiny_dir, tmp_path):
    p = argparse.ArgumentParser()
    add_demo_args(p)
    a = p.parse_args(["--model", str(tiny_dir), "--prompts", "2", "-n", "2", "--rounds", "2", "--max-new-tokens", "24",
                      "--out", str(tmp_path)])
    summary = run_demo(a)
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == summary
    assert (tmp_path / "demo_timeline.png").stat().st_size > 0
    adaptive, plain = summary["phases"]["adaptive"], summary["phases"]["plain"]
    for phase in (adaptive, plain):
        assert phase["samples"] == 8 and phase["errors"] == 0 and phase["samples_older_than_requested"] == 0
        assert phase["versions_served"] == {"0": 4, "1": 4}  # round r asked for version r
        # every wave's trace arrived (an engine appends it after the wave's results went out)
        assert phase["requests_traced"] == 8 and phase["wave_s"] > 0
    assert adaptive["tokens"] == plain["tokens"]  # same per-sample lengths in both modes
    assert adaptive["speculated_steps"] >= 0 and plain["speculated_steps"] == 0 and plain["acceptance"] is None
