"""Optimizers: the update rules, each as a torch.optim.Optimizer any recipe can name in `optimizer._component_`."""
