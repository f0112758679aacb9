"""Procedural scenes: determinism, exact traces, balanced answers, and the need to look at the image.

Assets: scenes drawn by stagereason.data_gen.scenes.
"""

import re
from collections import Counter, defaultdict

import pytest

from stagereason.data_gen.scenes import FAMILIES, _plural, make_example, make_examples
from stagereason.stages import answers_match, parse_trace


def test_deterministic_per_seed_and_index():
    a, b = make_example(3, 17), make_example(3, 17)
    assert a.image.tobytes() == b.image.tobytes() and a.trace == b.trace and a.question == b.question
    assert make_examples(5, seed=3)[2].trace == make_example(3, 2).trace  # index stream independent of n
    assert make_example(4, 17).image.tobytes() != a.image.tobytes()


def test_every_trace_is_strict_and_concludes_the_answer():
    for ex in make_examples(400, seed=2, difficulty=3):
        t = parse_trace(ex.trace.render())
        assert t == ex.trace
        assert answers_match(t.conclusion, ex.answer, ex.choices)


def test_all_families_occur_and_can_be_chosen():
    fams = Counter(e.family for e in make_examples(600, seed=0))
    assert set(fams) == set(FAMILIES) and min(fams.values()) > 60
    assert {e.family for e in make_examples(50, seed=0, families=("chart",))} == {"chart"}
    with pytest.raises(ValueError, match="unknown question families"):
        make_example(0, 0, families=("poetry",))
    with pytest.raises(ValueError, match="difficulty"):
        make_example(0, 0, difficulty=7)


def test_difficulty_raises_object_count():
    def mean_objects(level):
        exs = [e for e in make_examples(300, seed=1, difficulty=level) if e.family != "chart"]
        return sum(int(e.trace.caption.split()[3]) for e in exs) / len(exs)  # "The image shows N objects"

    assert mean_objects(3) > mean_objects(1) + 1


def test_best_text_only_guess_stays_far_below_full_marks():
    """Fit the best answer per question text on one half, score it on the other, per family."""
    exs = make_examples(4000, seed=7)
    fit, held = exs[:2000], exs[2000:]
    by_question, by_family = defaultdict(Counter), defaultdict(Counter)
    for e in fit:
        by_question[e.question][e.answer] += 1
        by_family[e.family][e.answer] += 1
    right, total = Counter(), Counter()
    for e in held:
        guess_from = by_question.get(e.question) or by_family[e.family]
        right[e.family] += answers_match(guess_from.most_common(1)[0][0], e.answer)
        total[e.family] += 1
    rates = {f: right[f] / total[f] for f in FAMILIES}
    assert all(r <= 0.6 for r in rates.values()), rates  # yes/no families sit near 0.5 by construction
    assert sum(rates.values()) / len(rates) < 0.45, rates


def test_yes_no_families_are_balanced():
    for fam in ("spatial", "compare"):
        answers = Counter(e.answer for e in make_examples(600, seed=5, families=(fam,)))
        assert abs(answers["Yes"] - answers["No"]) < 90, answers


def _caption_objects(caption):
    """(colour, shape) of each object, in the caption's order ("a red circle at the top; a small blue ...")."""
    items = caption.split(": ", 1)[1].rstrip(".").split("; ")
    return [tuple(w for w in item.split()[1:] if w not in ("small", "large"))[:2] for item in items]


def _walk(tally):
    """"red 1; green no; red 2" -> [("red", 1), ("green", None), ("red", 2)]."""
    steps = [s.rsplit(" ", 1) for s in tally.split("; ")]
    return [(label, None if n == "no" else int(n)) for label, n in steps]


@pytest.mark.parametrize("difficulty", [1, 3])
def test_counting_reasoning_walks_every_object_of_the_caption_in_order(difficulty):
    """count, arithmetic and compare decide object by object, and the running count ends at the answer."""

    def check_walk(tally, labels, hits):
        walk = _walk(tally)
        assert [label for label, _ in walk] == labels
        assert [count is not None for _, count in walk] == hits
        counts = [count for _, count in walk if count is not None]
        assert counts == list(range(1, len(counts) + 1))
        return len(counts)

    seen = Counter()
    for ex in make_examples(600, seed=4, difficulty=difficulty, families=("count", "arithmetic", "compare")):
        objs = _caption_objects(ex.trace.caption)  # (colour, shape) in the caption's order
        reasoning = ex.trace.reasoning
        if ex.family == "compare":
            m = re.fullmatch(r"Counting (\w+): (.*), so (\d+)\. Counting (\w+): (.*), so (\d+)\. "
                             r"(\d+) is (more|not more) than (\d+)\.", reasoning)
            assert m, reasoning
            for color, tally, total in (m.group(1, 2, 3), m.group(4, 5, 6)):
                hits = [c == color for c, _ in objs]
                assert check_walk(tally, [c for c, _ in objs], hits) == int(total), reasoning
            assert (m[7], m[9]) == (m[3], m[6]) and (m[8] == "more") == (int(m[3]) > int(m[6])) == (ex.answer == "Yes")
        else:
            m = re.fullmatch(r"Looking for (.*): (.*)\. That makes (\d+)\.", reasoning)
            assert m, reasoning
            target = m[1].split()  # "red objects", "squares", "red squares"; arithmetic: "squares and circles"
            if ex.family == "arithmetic" or len(target) == 1:
                labels = [shape for _, shape in objs]
            elif target[-1] == "objects":
                labels = [color for color, _ in objs]
            else:
                labels = [f"{color} {shape}" for color, shape in objs]
            hits = [all(w in target or _plural(w, 2) in target for w in label.split()) for label in labels]
            assert check_walk(m[2], labels, hits) == int(m[3]) == int(ex.answer), reasoning
        seen[ex.family] += 1
    assert min(seen.values()) > 150, seen
