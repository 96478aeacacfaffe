"""The run report: a Prefect table and markdown artifact, and the small summary a flow returns."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from .fmt import human_bytes


class BackupSummary(BaseModel):
    snapshot: str
    source: str
    serial: int
    files: int
    files_new: int
    files_changed: int
    files_unchanged: int
    errors: int
    bytes: int
    bytes_read: int
    bytes_added: int
    bytes_stored: int
    packs_uploaded: int
    packs_adopted: int
    chunks_verified: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def dedup_ratio(self) -> float:
        """Bytes read per byte of new data: how much reading found already stored."""
        return self.bytes_read / self.bytes_added if self.bytes_added else float("inf") if self.bytes_read else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_added / self.bytes_stored if self.bytes_stored else 1.0

    def rows(self) -> list[dict[str, str]]:
        return [
            {"measure": "snapshot", "value": f"{self.source} #{self.serial} ({self.snapshot[:12]})"},
            {"measure": "files new / changed / unchanged / errored",
             "value": f"{self.files_new} / {self.files_changed} / {self.files_unchanged} / {self.errors}"},
            {"measure": "bytes in snapshot", "value": human_bytes(self.bytes)},
            {"measure": "bytes read", "value": human_bytes(self.bytes_read)},
            {"measure": "bytes added (new data)", "value": human_bytes(self.bytes_added)},
            {"measure": "bytes stored (compressed, encrypted)", "value": human_bytes(self.bytes_stored)},
            {"measure": "dedup ratio (read / added)", "value": f"{self.dedup_ratio:,.2f}"},
            {"measure": "compression ratio (added / stored)", "value": f"{self.compression_ratio:,.2f}"},
            {"measure": "packs uploaded / adopted from an interrupted run",
             "value": f"{self.packs_uploaded} / {self.packs_adopted}"},
            {"measure": "chunks read back and verified", "value": str(self.chunks_verified)},
            {"measure": "duration", "value": f"{self.seconds:,.2f} s"},
            {"measure": "throughput (read)", "value": f"{human_bytes(self.throughput)}/s"},
        ]


@task(cache_policy=NO_CACHE, persist_result=False)
def report(summary: BackupSummary) -> BackupSummary:
    """Publish the run's statistics as artifacts that the Prefect UI shows with the run."""
    create_table_artifact(key="backup-summary", table=summary.rows(),
                          description=f"vaultflow backup of {summary.source}")
    lines = [f"# Backup of `{summary.source}`: snapshot {summary.serial}", ""]
    lines += [f"* **{r['measure']}**: {r['value']}" for r in summary.rows()]
    create_markdown_artifact(key="backup-report", markdown="\n".join(lines))
    return summary
