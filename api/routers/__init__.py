"""The routes, one router per area, in the order ``create_app`` includes them."""
