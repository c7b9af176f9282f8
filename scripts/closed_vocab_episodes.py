"""Diagnostic data: level-0 episodes whose answers come from a CLOSED set of 8 colours (train templates only).

Usage: python scripts/closed_vocab_episodes.py OUT.jsonl [COUNT]
Used to check whether the memory can carry content at all when the answer set is small (see the model card).
"""

import random
import sys

from deltamem_agents.train.episodes import save_episodes
from deltamem_agents.train.synthetic import SyntheticEpisodes

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"]

if __name__ == "__main__":
    out, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    generator = SyntheticEpisodes("train", 0)
    generator.attributes = [a for a in generator.attributes if a.pool == "colour"] or generator.attributes[:1]
    generator.values["colour"] = COLOURS
    rng = random.Random(0)
    save_episodes([generator.episode(rng, level=0, index=i) for i in range(count)], out)
    print(f"{count} episodes, attributes {[a.key for a in generator.attributes]}")
