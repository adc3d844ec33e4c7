"""Looking into trained networks: attention maps, model statistics, training curves and the figures of them."""
