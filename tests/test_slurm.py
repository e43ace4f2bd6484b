"""Which queued SLURM jobs a restarted Snakemake waits for (pipeline.slurm.py): this work
directory's Snakemake jobs that are still queued or running, from squeue's own format; the
waiting itself runs on a real cluster in tests/cluster/test_slurm_faults.py."""

from pipeline.slurm import SQUEUE_FORMAT, QueuedJob, killed_for, limit_hit, parse_squeue


def test_only_this_directorys_snakemake_jobs_still_in_the_queue_are_waited_for(tmp_path):
    here, other = tmp_path / "run", tmp_path / "other"
    here.mkdir()
    other.mkdir()
    listing = "\n".join([
        f"41|RUNNING|rule_pretrain|{here}",
        f"42|PENDING|rule_tokenize_wildcards_1-of-2|{here}/",
        f"43|COMPLETED|rule_prepare|{here}",  # left the queue but squeue still lists it
        f"44|RUNNING|rule_pretrain|{other}",  # another work directory's
        f"45|RUNNING|my own job|{here}",  # not Snakemake's
        "garbage",
    ])  # fmt: skip
    assert SQUEUE_FORMAT == "%i|%T|%k|%Z"
    assert parse_squeue(listing, str(here)) == [
        QueuedJob("41", "RUNNING", "pretrain"),
        QueuedJob("42", "PENDING", "tokenize_wildcards_1-of-2"),
    ]


def test_a_killed_jobs_slurm_log_names_the_limit_it_went_over(tmp_path):
    """The lines slurmstepd and slurmctld write into the job's SLURM log (22.05, as the cluster
    tests' jobs got them), found in the plugin's folder for the rule."""
    memory = (
        "slurmstepd-vm: error: StepId=92.0 exceeded memory limit (640229376 > 314572800), "
        "being killed\nslurmstepd-vm: error: Exceeded job memory limit\n"
    )
    time = "slurmstepd: error: *** JOB 95 ON vm CANCELLED AT 2026-12-05T12:01:02 DUE TO TIME LIMIT"
    assert limit_hit(memory) == "went over its memory limit (--mem 300 MB; it used 610 MB)"
    assert limit_hit(time) == "went over its time limit (--time)"
    cgroup = (  # a cluster whose cgroups enforce --mem (SLURM's task/cgroup wording)
        "slurmstepd: error: Detected 1 oom_kill event in StepId=7.0. Some of the step tasks "
        "have been OOM Killed.\n"
    )
    assert limit_hit(cgroup) == "went over its memory limit (--mem)"
    assert limit_hit("srun: error: vm: task 0: Exited with exit code 1\n") is None

    logs = tmp_path / "slurm_logs"
    assert killed_for("pretrain", logs) is None
    (logs / "rule_pretrain").mkdir(parents=True)
    (logs / "rule_pretrain" / "92.log").write_text(memory)
    assert killed_for("pretrain", logs) == (
        "SLURM job 92 went over its memory limit (--mem 300 MB; it used 610 MB)"
    )
