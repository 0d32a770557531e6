#!/usr/bin/env python3
"""The main job (see mdsens/demo.py): relax the paper's packing, compute and plot
dx*/d(small diameter), write out/demo/ and print a JSON summary."""

from mdsens.demo import main

if __name__ == "__main__":
    main()
