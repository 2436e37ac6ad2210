"""The periodic jobs: prune, clean, scrub and prefetch, and their schedule."""
