"""Programs: the deltamem CLI, the memory demo, the terminal chat."""
