"""Closed-set facts (rung 1 of the memory ladder): a colour (8), a weekday (7), a pet kind (6) and a 3-digit number
stated early in a multi-session conversation, followed by small talk, asked after the last session.

The answer values come from closed sets by design; what is held out is the WORDING. Every fact has train
templates (statement + question) and test templates that training never sees, and the small talk comes from
the filler's own train / test split. The test set is a pure function of :data:`TEST_SEED` and
:data:`TEST_CONVERSATIONS`; its ``tune`` half is for choosing a recipe, its ``report`` half is reported once for
the chosen one (``closed_facts_test(half)``). ``TEST_SHA256`` pins its content (tests check it).

Layout of a test conversation: session 1 opens with the four facts (each one user message with an assistant
acknowledgement, in a random order), then 6-10 messages of small talk over sessions 1-3, so the facts are at
least six messages before the question and outside a read window of two messages.
"""

import hashlib
import json
import random
from dataclasses import dataclass

from deltamem_agents.train.episodes import Episode, Question
from deltamem_agents.train.filler import FillerSource
from deltamem_agents.train.synthetic import turns_to_sessions

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PETS = ("dog", "cat", "rabbit", "hamster", "parrot", "goldfish")
VALUES = {"colour": COLOURS, "weekday": WEEKDAYS, "pet": PETS}

TEST_SEED = 20261201
TEST_CONVERSATIONS = 100  # x 4 facts = 400 questions: 200 in each half
TEST_SHA256 = "2630e718de3d61bd05c8679544cfcff1558be026c522c6d5168d1dae8c105a30"  # of closed_facts_test("all")


@dataclass(frozen=True)
class Template:
    """A way to state one kind of fact and to ask for it: ``statement`` has a ``{v}`` slot."""

    kind: str
    statement: str
    question: str


def _t(kind, statement, question):
    return Template(kind, statement, question)


TRAIN_TEMPLATES = (
    _t("colour", "My car is {v}.", "What colour is my car?"),
    _t("colour", "I painted my bedroom {v} last week.", "What colour is my bedroom?"),
    _t("colour", "My new bike is {v}.", "What colour is my bike?"),
    _t("colour", "I bought a {v} umbrella.", "What colour is my umbrella?"),
    _t("colour", "My favourite colour is {v}.", "What is my favourite colour?"),
    _t("colour", "Our front door is {v}.", "What colour is our front door?"),
    _t("weekday", "My yoga class is on {v}.", "Which day is my yoga class?"),
    _t("weekday", "I work from home every {v}.", "Which day do I work from home?"),
    _t("weekday", "The bins go out on {v}.", "On which day do the bins go out?"),
    _t("weekday", "My sister visits every {v}.", "Which day does my sister visit?"),
    _t("weekday", "I have band practice on {v}.", "When do I have band practice?"),
    _t("pet", "I have a pet {v}.", "What pet do I have?"),
    _t("pet", "We adopted a {v} last year.", "What animal did we adopt?"),
    _t("pet", "My daughter wants to name her {v} Biscuit.", "What kind of pet does my daughter have?"),
    _t("pet", "Our {v} is called Pepper.", "What kind of animal is Pepper?"),
    _t("number", "My locker number is {v}.", "What is my locker number?"),
    _t("number", "I live at number {v}.", "What is my house number?"),
    _t("number", "My room at the hotel is {v}.", "What is my hotel room number?"),
    _t("number", "The bus I take is the {v}.", "Which bus do I take?"),
    _t("number", "My ticket number is {v}.", "What is my ticket number?"),
)
TEST_TEMPLATES = (
    _t("colour", "Just so you know, the backpack I carry to work is {v}.", "Remind me, which colour is my backpack?"),
    _t("colour", "We finally repainted the kitchen walls, they're {v} now.", "What colour are my kitchen walls?"),
    _t("colour", "The scarf my grandmother knitted for me is {v}.", "Which colour is the scarf from my grandmother?"),
    _t("weekday", "Piano lessons moved, they're on {v} from now on.", "On what day are my piano lessons?"),
    _t("weekday", "The farmers' market I like only runs on {v}.", "Which day does my farmers' market run?"),
    _t("weekday", "My dentist appointment is booked for {v}.", "What day is my dentist appointment?"),
    _t("pet", "At home a little {v} keeps me company.", "What kind of pet keeps me company at home?"),
    _t("pet", "My neighbour asked me to feed her {v} this week.", "Which animal am I feeding for my neighbour?"),
    _t("pet", "The kids begged and now we own a {v}.", "What pet did the kids get?"),
    _t("number", "Write down my gym membership code: {v}.", "What is my gym membership code?"),
    _t("number", "The parcel locker I was given is number {v}.", "Which parcel locker number was I given?"),
    _t("number", "My seat for the concert is {v}.", "What is my seat number for the concert?"),
)


def _composed(kind, things, statements, questions):
    """Every statement frame x question frame x thing: ``{t}`` is the thing, ``{v}`` the value's slot."""
    return tuple(
        _t(kind, s.replace("{t}", thing), q.replace("{t}", thing))
        for thing in things
        for s in statements
        for q in questions
    )


# Training phrasings composed from many things and frames (``--templates varied``), for transfer to wordings
# training never sees. None of the test templates' things (backpack, kitchen walls, scarf, piano lessons,
# farmers' market, dentist, gym code, parcel locker, concert seat, a pet kept for a neighbour or begged for by
# kids) or frames ("just so you know", "remind me", "from now on", "write down", ...) is used;
# tests/test_closed_facts.py checks it.
VARIED_TRAIN_TEMPLATES = (
    *_composed(
        "colour",
        (
            "car",
            "bike",
            "umbrella",
            "mug",
            "jacket",
            "sofa",
            "tent",
            "kayak",
            "phone case",
            "raincoat",
            "notebook",
            "suitcase",
            "helmet",
            "wallet",
            "lamp",
            "hat",
        ),
        ("My {t} is {v}.", "The {t} I own is {v}.", "I went with {v} for my new {t}.", "Fun fact: my {t} is {v}."),
        ("What colour is my {t}?", "Which colour is the {t} I own?", "Do you know what colour my {t} is?"),
    ),
    *_composed(
        "weekday",
        (
            "yoga class",
            "swimming lesson",
            "book club",
            "team meeting",
            "football practice",
            "laundry day",
            "chess club",
            "pottery class",
            "choir rehearsal",
            "movie night",
            "karate class",
            "cleaning day",
        ),
        ("My {t} is on {v}.", "I always have {t} on {v}.", "We moved my {t} to {v}.", "Every {v} is my {t}."),
        ("Which day is my {t}?", "On which day is my {t}?", "When do I have my {t}?"),
    ),
    *_composed(
        "pet",
        ("my brother", "my aunt", "my best friend", "my roommate", "my grandfather", "my son", "my boss", "my cousin"),
        ("These days {t} has a pet {v}.", "It turns out {t} recently got a {v}.", "At home {t} looks after a {v}."),
        ("What pet does {t} have?", "What kind of animal does {t} have?", "Which animal does {t} look after?"),
    ),
    *_composed(
        "number",
        (
            "locker number",
            "house number",
            "hotel room number",
            "bus number",
            "ticket number",
            "desk number",
            "order number",
            "table number",
            "flight number",
            "apartment number",
            "badge number",
            "platform number",
        ),
        ("My {t} is {v}.", "The {t} I got is {v}.", "For the record, my {t} is {v}.", "I was told my {t} is {v}."),
        ("What is my {t}?", "Which {t} do I have?", "Do you know my {t}?"),
    ),
)
KINDS = ("colour", "weekday", "pet", "number")
ACKS = ("Got it, I'll remember that.", "Noted!", "Thanks for telling me.", "Okay, good to know.")
TEST_ACKS = ("Understood.", "All right, noted down.", "Sure, I have that.")

# curriculum levels of the training episodes (one fact unless said): what comes after the fact(s)
TRAIN_LEVELS = {
    0: dict(facts=1, after=(0, 0), sessions=1),  # the fact is the last message pair
    1: dict(facts=1, after=(1, 3), sessions=1),  # 1-3 small-talk pairs after
    2: dict(facts=(1, 4), after=(3, 5), sessions=(1, 3)),  # 1-4 facts, then 6-10 small-talk messages
}


def _value(rng: random.Random, kind: str) -> str:
    return str(rng.randrange(100, 1000)) if kind == "number" else rng.choice(VALUES[kind])


def _pick(rng: random.Random, spec):
    return rng.randint(*spec) if isinstance(spec, tuple) else spec


class ClosedFactEpisodes:
    """Generator of closed-fact episodes with the ``train`` or the ``test`` templates and small talk."""

    def __init__(self, split: str = "train", use_chitchat: bool = True, templates: str = "base"):
        """``templates``: ``base`` (:data:`TRAIN_TEMPLATES`) or ``varied`` (:data:`VARIED_TRAIN_TEMPLATES`, train
        only); the test split always uses :data:`TEST_TEMPLATES`."""
        if split not in ("train", "test"):
            raise ValueError(f"closed-fact split must be 'train' or 'test', got {split!r}")
        if templates not in ("base", "varied") or (split == "test" and templates != "base"):
            raise ValueError(f"templates must be 'base' or 'varied' (train split only), got {templates!r}")
        self.split = split
        train = TRAIN_TEMPLATES if templates == "base" else VARIED_TRAIN_TEMPLATES
        self.templates = train if split == "train" else TEST_TEMPLATES
        self.acks = ACKS if split == "train" else TEST_ACKS
        self.filler = FillerSource(split, 0, use_chitchat)

    def episode(self, rng: random.Random, kinds, after_pairs: int, sessions: int, index: int) -> Episode:
        """Facts of ``kinds`` (in that order, first), ``after_pairs`` small-talk pairs, ``sessions`` sessions."""
        facts = []
        for kind in kinds:
            template = rng.choice([t for t in self.templates if t.kind == kind])
            facts.append((template, _value(rng, kind)))
        turns = [(t.statement.format(v=v), rng.choice(self.acks), i) for i, (t, v) in enumerate(facts)]
        turns += [(u, a, None) for u, a in self.filler.sample(rng, after_pairs)]
        # session cuts only inside the small talk (the facts open session 1)
        cut_range = list(range(len(facts) + 1, len(turns)))
        cuts = sorted(rng.sample(cut_range, min(sessions - 1, len(cut_range))))
        built, evidence = turns_to_sessions(turns, [0, *cuts, len(turns)], lambda s: f"2024-0{1 + s}-0{1 + s}")
        questions = tuple(
            Question(question=t.question, answer=v, kind=t.kind, evidence=(evidence[i],))
            for i, (t, v) in enumerate(facts)
        )
        return Episode(
            id=f"closed-{self.split}-{index:05d}",
            sessions=tuple(built),
            questions=questions,
            split=self.split,
            meta={"filler": self.filler.source, "after_messages": 2 * after_pairs},
        )

    def train_episodes(self, count: int, level: int, seed: int = 0) -> list[Episode]:
        """``count`` training episodes at curriculum ``level`` (:data:`TRAIN_LEVELS`)."""
        if level not in TRAIN_LEVELS:
            raise ValueError(f"closed-fact level must be one of {sorted(TRAIN_LEVELS)}, got {level}")
        spec = TRAIN_LEVELS[level]
        rng = random.Random(f"closed:{self.split}:{seed}:{level}")
        episodes = []
        for i in range(count):
            kinds = rng.sample(KINDS, _pick(rng, spec["facts"]))
            episodes.append(self.episode(rng, kinds, _pick(rng, spec["after"]), _pick(rng, spec["sessions"]), i))
        return episodes


def closed_facts_test(half: str = "tune", use_chitchat: bool = True) -> list[Episode]:
    """The fixed rung-1 test set: ``tune`` (first 50 conversations) or ``report`` (last 50) or ``all``.

    Each conversation states all four kinds of fact (order shuffled) in its first messages, then 3-5 small-talk
    pairs (6-10 messages) over 2-3 sessions; test templates and test-split small talk only."""
    halves = {"tune": slice(0, TEST_CONVERSATIONS // 2), "report": slice(TEST_CONVERSATIONS // 2, None)}
    if half not in (*halves, "all"):
        raise ValueError(f"half must be 'tune', 'report' or 'all', got {half!r}")
    generator = ClosedFactEpisodes("test", use_chitchat)
    rng = random.Random(f"closed-test:{TEST_SEED}")
    episodes = []
    for i in range(TEST_CONVERSATIONS):
        kinds = rng.sample(KINDS, len(KINDS))
        episodes.append(generator.episode(rng, kinds, rng.randint(3, 5), rng.randint(2, 3), i))
    return episodes if half == "all" else episodes[halves[half]]


def content_sha256(episodes: list[Episode]) -> str:
    """A hash of the episodes' JSON (pins the fixed test set)."""
    text = "\n".join(json.dumps(e.to_json(), sort_keys=True, ensure_ascii=False) for e in episodes)
    return hashlib.sha256(text.encode()).hexdigest()
