"""Progress of a long stage: an estimated total that turns out low never shows more than 100 %
nor a negative ETA."""
import logging

from tasks.common import TokenProgress


def test_progress_past_an_estimated_total_stays_at_100_percent_without_negative_eta(caplog):
    logger = logging.getLogger("progress-test")
    p = TokenProgress("smollm2", 1000, logger, every=0.0)
    with caplog.at_level(logging.INFO, logger="progress-test"):
        p.advance(600)
        assert "(60%)" in p.line()
        p.advance(580)                       # 1,180 done against an estimate of 1,000
    p.close()
    assert p.total == 1180
    last = caplog.records[-1].getMessage()
    assert "1,180/1,180" in last and "(100%)" in last and "ETA 0 min 00 s" in last
    assert "-" not in last.split("ETA")[1]
