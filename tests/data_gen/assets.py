"""Test assets for data_gen: LLaVA-style datasets with real image files, written here with PIL."""

import json

from PIL import Image


def write_llava(root, rows, name="data.jsonl", extra_lines=()):
    """Write `rows` as JSONL (plus raw `extra_lines`), creating every referenced image that does not exist."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        p = root / "imgs" / f"{i}.jpg"
        if not p.exists():
            Image.new("RGB", (40 + i, 30), (30 * i, 100, 200)).save(p)
    (root / "imgs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    path = root / name
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def row(rid, question, answer, image="imgs/0.jpg", **extra):
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


# id -> expected outcome: "accepted" or the reject reason category
EXPECTED = {
    "ok": "accepted", "multi": "accepted", "flaky500": "accepted", "ratelimited": "accepted", "slow": "accepted",
    "malformed": "accepted", "disconnect": "accepted", "empty_then_ok": "accepted", "refuses": "refusal",
    "wrong": "wrong_answer", "broken": "format", "judged_yes": "accepted", "missing_image": "bad_input",
    "corrupt_image": "bad_input", "bad_roles": "bad_input", "no_answer": "bad_input", "no_placeholder": "accepted",
    "line-18": "bad_input",
}
