"""benchmarks/recovery.py's figures on made-up ledger rows and log lines (no cluster runs)."""

import time

from benchmarks import recovery_figures
from benchmarks.recovery_figures import agent_started_at, figures, first_contribution, global_epochs, stalls


def row(t, instance_id, epoch, samples=100, state="training", rate=4.0):
    return {"t": t, "instance_id": instance_id, "state": state, "epoch": epoch, "samples": samples,
            "samples_per_second": rate}


def test_the_global_epoch_is_the_highest_a_training_agent_reports_per_tick():
    rows = [row(1, "a", 3), row(1, "b", 4), row(1, "c", 9, state="starting"), row(2, "a", 5)]
    assert global_epochs(rows) == [(1, 4), (2, 5)]


def test_a_replacement_contributes_once_it_trains_with_samples_at_the_swarms_epoch():
    rows = [row(10, "old", 6), row(10, "new", 0, samples=0, state="starting"),
            row(12, "old", 7), row(12, "new", 0, samples=8),      # training, but still at epoch 0: loading state
            row(14, "old", 7), row(14, "new", 7, samples=0),      # in step, no sample counted yet
            row(16, "old", 8), row(16, "new", 7, samples=16)]     # one epoch behind: delayed updates allow it
    assert first_contribution(rows, "new") == 16
    assert first_contribution(rows, "absent") is None


def test_the_agent_start_takes_the_launch_date_and_rolls_over_midnight():
    launched = time.mktime((2026, 12, 4, 23, 59, 50, 0, 0, -1))
    assert agent_started_at("23:59:58 vm i-1: agent started (pid 7)\n", launched) == launched + 8
    assert agent_started_at("00:00:05 vm i-1: agent started (pid 7)\n", launched) == launched + 15
    assert agent_started_at("00:00:05 vm i-1: booted\n", launched) is None


def test_stall_and_resume_lines_are_read_from_the_agent_log():
    log = ("12:00:01 agent: checkpoint epoch 2: snapshot took 0.250s of training (the stall), "
           "0.200s of it waiting for the delayed update, uploading to s3://b in the background\n"
           "12:00:09 agent: checkpoint epoch 4: snapshot took 0.050s of training (the stall), uploading\n"
           "12:00:11 agent: checkpoint epoch 6: snapshot took 0.150s of training (the stall), "
           "0.100s of it waiting for state averaging, uploading to s3://b in the background\n"
           "12:01:00 agent: resumed from checkpoint epoch 4 of s3://us-east/c?endpoint=x\n")
    assert stalls(log) == [(0.25, 0.2), (0.05, 0.0), (0.15, 0.1)]
    assert recovery_figures.resumed_epochs(log) == [4]


def test_a_step_lasts_the_batch_over_the_mean_rate_of_training_agents():
    rows = [row(1, "a", 1, rate=2.0), row(1, "b", 1, rate=6.0), row(1, "c", 1, rate=0.0),
            row(1, "d", 1, state="starting", rate=100.0)]
    assert recovery_figures.mean_step_seconds(rows, 8) == 2.0
    assert recovery_figures.mean_step_seconds([], 8) is None


def test_a_noticed_preemption_that_never_lowers_the_epoch_costs_none():
    series = [(0, 0), (10, 1), (20, 2), (30, 3), (40, 3), (50, 4), (60, 5)]
    kept = recovery_figures.noticed_preemption(series, noticed_at=30, until=60, before_from=0)
    assert (kept["epoch_at_notice"], kept["epochs_lost"], kept["never_fell"], kept["advanced_by"]) == (3, 0, True, 2)
    assert kept["seconds_per_epoch_before"] == 10 and kept["seconds_per_epoch_during"] == 15
    fell = recovery_figures.noticed_preemption([(0, 0), (30, 3), (40, 2), (50, 3)], noticed_at=30, until=50,
                                               before_from=0)
    assert (fell["epochs_lost"], fell["never_fell"], fell["advanced_by"]) == (1, False, 0)


def test_each_figure_is_stated_against_its_target():
    result = figures(
        {"seconds_from_notice": 40.0, "seconds_from_agent_start": 15.0},
        {"epoch_at_notice": 3, "epochs_lost": 0, "never_fell": True, "advanced_by": 2,
         "seconds_per_epoch_before": 10.0},
        {"epoch_at_loss": 9, "resumed_epoch": 6, "epochs_lost": 3, "every_epochs": 2},
        {"stalls": [(0.5, 0.4), (1.5, 1.0)], "mean_step_seconds": 2.0},
    )
    assert result["replacement"]["epochs_from_agent_start"] == 1.5 and result["replacement"]["met"] is False
    assert result["noticed_preemption"]["met"] is True
    assert result["fleet_loss"]["epochs_lost_vs_every_epochs"] == 1.5 and result["fleet_loss"]["met"] is False
    stall = result["checkpoint_stall"]
    assert (stall["stall_fraction_of_step"], stall["max_stall_fraction_of_step"], stall["met"]) == (0.5, 0.75, True)
    assert stall["mean_waiting_for_delayed_update_seconds"] == 0.7
    assert abs(stall["snapshot_only_fraction_of_step"] - 0.15) < 1e-9


def test_a_figure_without_measurements_says_so_rather_than_passing():
    result = figures({}, {"epochs_lost": None}, {"epochs_lost": None, "every_epochs": 2},
                     {"stalls": [], "mean_step_seconds": None})
    assert [result[k]["met"] for k in ("replacement", "noticed_preemption", "fleet_loss", "checkpoint_stall")] == \
        [None, None, None, None]


def test_the_start_of_an_agent_is_read_from_its_stamped_lines():
    log = ("12:00:05 agent: imports done 5.2s after the agent started\n"
           "12:00:07 agent: joined the swarm as Qm1 at /ip4/1.2.3.4/tcp/5/p2p/Qm1 (7.1s after the agent started)\n"
           "12:00:14 kernels.paced_progress: state from a peer: epoch 0 -> 20 in 3.5s (the swarm's records say 20)\n"
           "12:00:10 agent: optimizer built 10.4s after the agent started\n"
           "12:00:15 agent: first step done at epoch 20 15.0s after the agent started\n"
           "12:00:16 agent: contributing: first samples counted toward the swarm's epoch 20, 15.9s after the "
           "agent started\n"
           "12:00:17 agent: first epoch stepped with the swarm: 20 -> 21, 17.5s after the agent started\n")
    start = recovery_figures.startup(log)
    assert start == {"imports_done": 5.2, "joined_swarm": 7.1, "optimizer_built": 10.4, "resumed_from_store": None,
                     "first_step_done": 15.0, "contributing": 15.9, "first_epoch_stepped": 17.5,
                     "state_downloads": [(0, 20, 3.5)]}
    assert recovery_figures.startup("")["first_step_done"] is None


def test_a_replacement_is_timed_by_its_own_line_and_the_controllers_view_is_kept():
    own = recovery_figures.replacement_times({"contributing": 15.9}, started=100.0, seen_at=121.0, noticed_at=98.0)
    assert (own["seconds_from_agent_start"], own["measured_from"]) == (15.9, "agent log")
    assert (own["seen_by_controller_seconds_from_agent_start"], own["seconds_from_notice"]) == (21.0, 23.0)
    assert own["agent_start_from_notice"] == 2.0
    # an agent of an older build logs no such line: the controller's view is the figure
    older = recovery_figures.replacement_times({"contributing": None}, started=100.0, seen_at=121.0, noticed_at=98.0)
    assert (older["seconds_from_agent_start"], older["measured_from"]) == (21.0, "controller ticks")
    unknown = recovery_figures.replacement_times({}, started=None, seen_at=121.0, noticed_at=98.0)
    assert unknown["seconds_from_agent_start"] is None and unknown["agent_start_from_notice"] is None
