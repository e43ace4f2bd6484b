"""Which queued SLURM jobs a restarted Snakemake waits for (pipeline/slurm_queue.py): this work
directory's Snakemake jobs that are still queued or running, from squeue's own format; the
waiting itself runs on a real cluster in tests/cluster/test_slurm_faults.py."""

from pipeline.slurm_queue import SQUEUE_FORMAT, QueuedJob, parse_squeue


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
