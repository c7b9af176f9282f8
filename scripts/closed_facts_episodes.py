"""Training data for rung 1: closed-fact episodes with the TRAIN templates and train-split small talk only.

Usage: python scripts/closed_facts_episodes.py OUT.jsonl COUNT [LEVEL:FRACTION,...]   (default 0:0.3,1:0.3,2:0.4)
Levels (deltamem_agents.train.closed_facts.TRAIN_LEVELS): 0 the fact is the last message pair; 1 one to three
small-talk pairs after it; 2 one to four facts, then six to ten small-talk messages over one to three sessions
(the test set's layout). The file is in level order; ``deltamem train`` shuffles the batches.
"""

import sys

from deltamem_agents.train.closed_facts import ClosedFactEpisodes
from deltamem_agents.train.episodes import save_episodes

if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out, count = sys.argv[1], int(sys.argv[2])
    mix = [
        (int(a), float(b))
        for a, b in (p.split(":") for p in (sys.argv[3] if len(sys.argv) > 3 else "0:0.3,1:0.3,2:0.4").split(","))
    ]
    generator, episodes = ClosedFactEpisodes("train"), []
    total = sum(f for _, f in mix)
    for level, fraction in mix:
        episodes += generator.train_episodes(round(count * fraction / total), level, seed=len(episodes))
    save_episodes(episodes, out)
    print(f"{len(episodes)} episodes, levels {mix}, filler {generator.filler.source}")
