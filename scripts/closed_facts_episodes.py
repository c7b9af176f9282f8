"""Training data for rung 1: closed-fact episodes with the TRAIN templates and train-split small talk only.

Usage: python scripts/closed_facts_episodes.py OUT.jsonl COUNT [LEVEL:FRACTION,...] [--varied]
(levels default 0:0.3,1:0.3,2:0.4; ``--varied``: the 552 composed phrasings VARIED_TRAIN_TEMPLATES instead of the
20 TRAIN_TEMPLATES)
Levels (deltamem_agents.train.closed_facts.TRAIN_LEVELS): 0 the fact is the last message pair; 1 one to three
small-talk pairs after it; 2 one to four facts, then six to ten small-talk messages over one to three sessions
(the test set's layout). The file is in level order; ``deltamem train`` shuffles the batches.
"""

import sys

from deltamem_agents.train.closed_facts import ClosedFactEpisodes
from deltamem_agents.train.episodes import save_episodes

if __name__ == "__main__":
    varied = "--varied" in sys.argv
    argv = [a for a in sys.argv if a != "--varied"]
    if len(argv) < 3:
        raise SystemExit(__doc__)
    out, count = argv[1], int(argv[2])
    mix = [
        (int(a), float(b))
        for a, b in (p.split(":") for p in (argv[3] if len(argv) > 3 else "0:0.3,1:0.3,2:0.4").split(","))
    ]
    generator, episodes = ClosedFactEpisodes("train", templates="varied" if varied else "base"), []
    total = sum(f for _, f in mix)
    for level, fraction in mix:
        episodes += generator.train_episodes(round(count * fraction / total), level, seed=len(episodes))
    save_episodes(episodes, out)
    templates, filler = len(generator.templates), generator.filler.source
    print(f"{len(episodes)} episodes, levels {mix}, {templates} templates, filler {filler}")
