"""The machinery behind main_mnist.py, predict.py and app.py, one job a file: the command line made from the block
(settings), run folders and their records (runs, records), the device and layout (hardware), the figures, what a
model knows (robustness, evaluation), the LR range test (lr_finder), images read as MNIST digits (images), safe
files (files) and one-line errors (errors). A learner's edits belong in the files at the top, not here.
"""
