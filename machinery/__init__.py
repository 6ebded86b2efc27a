"""What a learner need not open: the settings made from main_mnist.py's block, run folders and their records, the
report at the end of a run, --compare, --eval-only, --find-lr, figures, and the image reading predict.py and app.py
share. It uses the core (utils.py, model.py, augment.py); the core never imports it."""
