import pytest

from prune_lab.core.ranking import Ranking


@pytest.fixture
def count_sorts(monkeypatch):
    """A list that gets one entry per ranking sort (Ranking.from_scores call)."""
    calls = []
    original = Ranking.from_scores.__func__

    def counting(cls, *a, **k):
        calls.append(1)
        return original(cls, *a, **k)

    monkeypatch.setattr(Ranking, "from_scores", classmethod(counting))
    return calls
