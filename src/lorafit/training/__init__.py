"""The training stage: the recipe (one run, top to bottom), the Trainer hooks lorafit changes, checkpoints and
exact resume, and the callbacks (history, guards, signals, best step). May use every package except cli."""
