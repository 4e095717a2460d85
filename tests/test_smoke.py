from conftest import Live


def test_health(live: Live) -> None:
    answer = live.get("/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok"


def test_validate_issued_key(live: Live) -> None:
    key = live.issue("pro-monthly", days=30)
    answer = live.post("/api/license/validate", {"key": key, "machine_id": "m-1"}).json()
    assert answer["code"] == "VALID"
    assert answer["activated"] is True
    assert "lease" in answer
