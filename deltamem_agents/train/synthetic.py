"""Synthetic multi-session episodes made by our own code: facts, preferences, tasks and ticket details stated in
early sessions, small talk in between, questions asked after the last session.

Splits: every attribute template (the statement and question wording of one detail) and every value (names,
cities, numbers...) belongs to exactly one of train / dev / test, chosen by a seeded hash, so no template or
entity is shared between train and test.

Curriculum (``level``):
    0  one fact, stated in the last turn of the history
    1  one fact, followed by 1-3 small-talk turns
    2  one or two facts, 2-6 small-talk turns, up to two sessions
    3  two to four facts, 4-12 small-talk turns over two or three sessions
"""

import random
from dataclasses import dataclass

from deltamem_agents.train.episodes import Episode, Question, Session
from deltamem_agents.train.filler import SPLITS, FillerSource, split_of

NAMES = (
    "Maren Tobias Ingrid Rafael Selma Joaquin Priya Anselm Liesel Dmitri Ottilie Kwame Yara Benedikt Noemi Caspar "
    "Fenna Ilias Greta Matteo Soraya Lennart Amara Quentin Hedda Emil Zofia Rasmus Linnea Teodor Ayla Bruno "
    "Cosima Farid Hanna Jonas Kira Leon Mila Nils Olga Pavel Rosa Silas Tilda Viktor Wanda Xaver Zita Arvid "
    "Bianca Cyrus Delia Elio Freya Gideon Helga Ivo Janne Karla Lorenz Malin Nadia Oskar Petra Ronja Stellan "
    "Tamsin Ulla Vera Wilhelm Yannick Zeno Agnes Boris Clara Dario Elsa Fabian Gesa Hugo Irma Jasper Klara"
).split()
COLOURS = (
    "teal crimson amber lavender olive maroon turquoise coral indigo beige magenta ochre scarlet violet mint "
    "navy burgundy ivory charcoal mustard peach lilac emerald saffron cobalt rust sage plum tan cyan"
).split()
FOODS = (
    "lasagna sushi paella risotto ramen falafel goulash pierogi tacos curry dumplings moussaka couscous pho "
    "gnocchi burritos kimchi pancakes waffles croissants pretzels hummus enchiladas ravioli tiramisu baklava "
    "cheesecake brownies muffins noodles porridge omelettes quiche schnitzel"
).split()
CITIES = (
    "Lisbon Oslo Krakow Valencia Porto Tallinn Bergen Seville Ghent Lyon Bremen Turin Zagreb Riga Vilnius Utrecht "
    "Graz Bologna Malmo Aarhus Leipzig Dresden Bilbao Granada Nantes Toulouse Genoa Verona Salzburg Innsbruck "
    "Brno Gdansk Cork Galway Dundee Bristol Leeds Halifax Quebec Denver Austin Boise Tucson Kyoto Osaka Busan"
).split()
ITEMS = (
    "lanterns balloons napkins candles umbrellas batteries envelopes stamps paintbrushes notebooks scissors "
    "blankets cushions flashlights towels sandals sunscreen markers stickers ribbons glue twine hammers nails "
    "sponges kettles mugs spoons ladders buckets"
).split()
ANIMALS = (
    "parrot hamster tortoise ferret iguana rabbit goldfish gecko cockatoo chinchilla beagle poodle terrier "
    "dachshund labrador siamese canary hedgehog axolotl guinea-pig corgi greyhound collie budgie"
).split()
HOBBIES = (
    "pottery fencing archery climbing knitting woodworking calligraphy birdwatching rowing sailing chess "
    "juggling origami photography gardening baking kayaking skating surfing tango salsa yoga boxing cycling"
).split()
JOBS = (
    "pharmacist architect plumber librarian carpenter dentist florist translator veterinarian electrician "
    "journalist surveyor geologist baker tailor nurse pilot chemist optician locksmith welder curator"
).split()
POOLS = {
    "name": NAMES,
    "colour": COLOURS,
    "food": FOODS,
    "city": CITIES,
    "item": ITEMS,
    "animal": ANIMALS,
    "hobby": HOBBIES,
    "job": JOBS,
}


@dataclass(frozen=True)
class Attribute:
    """One detail a user can state: its kind, the pool its value comes from, wordings and the question."""

    key: str
    kind: str
    pool: str
    statements: tuple[str, ...]
    question: str


def _a(key, kind, pool, statements, question):
    return Attribute(key, kind, pool, tuple(statements), question)


ATTRIBUTES = (
    _a(
        "sister",
        "fact",
        "name",
        ["My sister is called {v}.", "By the way, my sister's name is {v}."],
        "What is my sister's name?",
    ),
    _a(
        "brother", "fact", "name", ["My brother's name is {v}.", "I have a brother, {v}."], "What is my brother's name?"
    ),
    _a("boss", "fact", "name", ["My boss is {v}.", "My manager at work is called {v}."], "Who is my boss?"),
    _a(
        "neighbour",
        "fact",
        "name",
        ["Our new neighbour is {v}.", "The neighbour next door is named {v}."],
        "What is my neighbour's name?",
    ),
    _a(
        "friend",
        "fact",
        "name",
        ["My best friend is {v}.", "{v} has been my best friend for years."],
        "Who is my best friend?",
    ),
    _a(
        "cousin",
        "fact",
        "name",
        ["My cousin {v} is visiting soon.", "My cousin is called {v}."],
        "What is my cousin's name?",
    ),
    _a(
        "dentist",
        "fact",
        "name",
        ["My dentist is Dr. {v}.", "I see Dr. {v} for my teeth."],
        "What is my dentist's name?",
    ),
    _a("coach", "fact", "name", ["My tennis coach is {v}.", "{v} coaches me at tennis."], "Who is my tennis coach?"),
    _a("hometown", "fact", "city", ["I grew up in {v}.", "My hometown is {v}."], "Where did I grow up?"),
    _a("work_city", "fact", "city", ["I work in {v} now.", "My office is in {v}."], "Which city do I work in?"),
    _a(
        "trip",
        "task",
        "city",
        ["Next month I am flying to {v}.", "I booked a trip to {v}."],
        "Where am I travelling next month?",
    ),
    _a(
        "conference",
        "task",
        "city",
        ["The conference this year is in {v}.", "Our team conference will be in {v}."],
        "Where is the conference this year?",
    ),
    _a(
        "fav_colour",
        "preference",
        "colour",
        ["My favourite colour is {v}.", "I love the colour {v}."],
        "What is my favourite colour?",
    ),
    _a("car_colour", "fact", "colour", ["My car is {v}.", "I drive a {v} car."], "What colour is my car?"),
    _a(
        "door_colour",
        "task",
        "colour",
        ["We will paint the front door {v}.", "The front door is going to be {v}."],
        "What colour will we paint the front door?",
    ),
    _a(
        "fav_food",
        "preference",
        "food",
        ["My favourite dish is {v}.", "Nothing beats {v} for me."],
        "What is my favourite dish?",
    ),
    _a(
        "allergy_food",
        "fact",
        "food",
        ["I can't eat {v}, it makes me sick.", "Please remember I avoid {v}."],
        "Which food do I avoid?",
    ),
    _a(
        "dinner_plan",
        "task",
        "food",
        ["I'm cooking {v} for dinner on Friday.", "Friday's dinner will be {v}."],
        "What am I cooking on Friday?",
    ),
    _a(
        "party_item",
        "task",
        "item",
        ["I still need to buy {v} for the party.", "Remind me to get {v} for the party."],
        "What do I need to buy for the party?",
    ),
    _a(
        "lost_item",
        "ticket",
        "item",
        ["I lost a box of {v} in the delivery.", "The parcel was missing the {v}."],
        "What was missing from my delivery?",
    ),
    _a("order_item", "ticket", "item", ["My order was for {v}.", "I ordered {v} last week."], "What did I order?"),
    _a(
        "return_item",
        "ticket",
        "item",
        ["I want to return the {v}.", "The {v} I bought are broken."],
        "What do I want to return?",
    ),
    _a("pet", "fact", "animal", ["I have a pet {v}.", "We adopted a {v} last year."], "What pet do I have?"),
    _a(
        "fav_animal",
        "preference",
        "animal",
        ["My favourite animal is the {v}.", "I adore every {v} I meet."],
        "What is my favourite animal?",
    ),
    _a("hobby", "preference", "hobby", ["My hobby is {v}.", "I spend my weekends on {v}."], "What is my hobby?"),
    _a(
        "new_hobby",
        "task",
        "hobby",
        ["I'm signing up for a {v} class.", "I want to learn {v} this year."],
        "What class am I signing up for?",
    ),
    _a(
        "sport",
        "preference",
        "hobby",
        ["I'm really into {v} lately.", "These days I love {v}."],
        "What am I into lately?",
    ),
    _a("job", "fact", "job", ["I work as a {v}.", "I'm a {v} by profession."], "What is my job?"),
    _a(
        "partner_job",
        "fact",
        "job",
        ["My partner is a {v}.", "My wife works as a {v}."],
        "What does my partner do for a living?",
    ),
    _a(
        "dream_job",
        "preference",
        "job",
        ["As a kid I wanted to be a {v}.", "My dream job was always {v}."],
        "What did I want to be as a kid?",
    ),
    _a(
        "ticket",
        "ticket",
        "number",
        ["My ticket number is {v}.", "The support ticket is #{v}."],
        "What is my ticket number?",
    ),
    _a("order_no", "ticket", "number", ["The order number is {v}.", "My order ID is {v}."], "What is my order number?"),
    _a("room", "fact", "number", ["I'm staying in room {v}.", "My hotel room is {v}."], "What is my room number?"),
    _a(
        "locker",
        "fact",
        "number",
        ["My gym locker is number {v}.", "I use locker {v} at the gym."],
        "What is my locker number?",
    ),
    _a(
        "pin_hint",
        "task",
        "number",
        ["The meeting code is {v}.", "Use code {v} to join the call."],
        "What is the meeting code?",
    ),
    _a("flight", "task", "number", ["My flight number is LX{v}.", "I'm on flight LX{v}."], "What is my flight number?"),
)
ACKS = (
    "Got it, I'll remember that.",
    "Noted!",
    "Thanks for telling me.",
    "Okay, good to know.",
    "I'll keep that in mind.",
)
LEVELS = {
    0: dict(facts=(1, 1), after=(0, 0), sessions=(1, 1)),
    1: dict(facts=(1, 1), after=(1, 3), sessions=(1, 1)),
    2: dict(facts=(1, 2), after=(2, 6), sessions=(1, 2)),
    3: dict(facts=(2, 4), after=(4, 12), sessions=(2, 3)),
}


def partition(items, seed: int, salt: str, held_out: float = 0.15) -> dict[str, list]:
    """Disjoint train / dev / test parts of ``items`` by a seeded shuffle; dev and test get ``held_out`` each
    (at least one item each)."""
    items = list(items)
    random.Random(f"{seed}:{salt}").shuffle(items)
    n = max(1, round(held_out * len(items)))
    return {"test": items[:n], "dev": items[n : 2 * n], "train": items[2 * n :]}


def turns_to_sessions(turns, bounds: list[int], date_of) -> tuple[list[Session], dict[int, tuple[int, int]]]:
    """Sessions of (user, assistant, fact index or None) turns cut at ``bounds``, dated ``date_of(session)``;
    and where each fact was stated: ``{fact: (session, message)}``."""
    sessions, evidence = [], {}
    for s in range(len(bounds) - 1):
        messages = []
        for user, assistant, fact in turns[bounds[s] : bounds[s + 1]]:
            if fact is not None:
                evidence[fact] = (s, len(messages))
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        sessions.append(Session(messages=tuple(messages), date=date_of(s)))
    return sessions, evidence


class SyntheticEpisodes:
    """Generator of synthetic episodes of one split.

    Args:
        split: ``train``, ``dev`` or ``test``.
        seed: the split seed: which templates and values go to which split (same seed = same partition).
        use_chitchat: draw small talk from ``chitchat-dataset`` when installed.
    """

    def __init__(self, split: str = "train", seed: int = 0, use_chitchat: bool = True):
        self.split, self.seed = split, seed
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.attributes = partition(ATTRIBUTES, seed, "attributes")[split]
        self.values = {p: partition(vals, seed, p)[split] for p, vals in POOLS.items()}
        self.filler = FillerSource(split, seed, use_chitchat)
        if not self.attributes:
            raise ValueError(f"seed {seed} leaves no attribute template for split {split!r}; choose another seed")

    def value(self, rng: random.Random, pool: str) -> str:
        if pool == "number":
            while True:  # 3-4 digit numbers; the hash of the number decides its split
                number = str(rng.randrange(100, 10000))
                if split_of(f"number:{number}", self.seed, (0.7, 0.15, 0.15)) == self.split:
                    return number
        return rng.choice(self.values[pool])

    def episode(self, rng: random.Random, level: int = 3, index: int = 0) -> Episode:
        """One episode at curriculum ``level`` (see the module docstring), drawn with ``rng``."""
        if level not in LEVELS:
            raise ValueError(f"curriculum level must be one of {sorted(LEVELS)}, got {level}")
        spec = LEVELS[level]
        n_facts = min(rng.randint(*spec["facts"]), len(self.attributes))
        attributes = rng.sample(self.attributes, n_facts)
        facts = [(a, self.value(rng, a.pool)) for a in attributes]
        after = rng.randint(*spec["after"])
        n_sessions = rng.randint(*spec["sessions"])
        # Blocks in time order: facts interleaved with small talk, then `after` small-talk turns at the end.
        before = self.filler.sample(rng, rng.randint(0, 2) if level >= 2 else 0)
        turns: list[tuple[str, str, int | None]] = [(u, a, None) for u, a in before]
        for i, (attribute, value) in enumerate(facts):
            turns.append((rng.choice(attribute.statements).format(v=value), rng.choice(ACKS), i))
            if i < len(facts) - 1:
                turns += [(u, a, None) for u, a in self.filler.sample(rng, rng.randint(0, 2))]
        turns += [(u, a, None) for u, a in self.filler.sample(rng, after)]
        cuts = sorted(rng.sample(range(1, len(turns)), min(n_sessions - 1, len(turns) - 1))) if len(turns) > 1 else []
        sessions, evidence = turns_to_sessions(turns, [0, *cuts, len(turns)], lambda s: f"2024-0{1 + s}-1{s}")
        questions = tuple(
            Question(question=a.question, answer=v, kind=a.kind, evidence=(evidence[i],))
            for i, (a, v) in enumerate(facts)
        )
        return Episode(
            id=f"syn-{self.split}-{self.seed}-{level}-{index:06d}",
            sessions=tuple(sessions),
            questions=questions,
            split=self.split,
            meta={"level": level, "filler": self.filler.source},
        )

    def episodes(self, count: int, level: int = 3, seed: int | None = None) -> list[Episode]:
        """``count`` episodes at ``level``; ``seed`` (default: the split seed) fixes the draw."""
        rng = random.Random(f"{self.split}:{self.seed if seed is None else seed}:{level}")
        return [self.episode(rng, level, i) for i in range(count)]
