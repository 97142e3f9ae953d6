"""Training an adapter: the recipe (TrainSettings, train_adapter) and the data windows."""
