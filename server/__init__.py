"""The coordinating side: Flower ServerApp, aggregation strategy and run records."""
