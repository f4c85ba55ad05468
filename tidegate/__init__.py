"""tidegate: the command line that ties the ingress and the scaler together."""
