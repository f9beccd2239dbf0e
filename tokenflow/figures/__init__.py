"""Drawings of what the model computes (the paper's Fig. 2 and Fig. 3), shared by the figure tools and the web app."""
