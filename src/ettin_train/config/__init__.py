"""Recipes: the schema (every valid key), loading with inheritance and overrides, and the checks."""

from ettin_train.config.loading import RecipeError, load_recipe, recipe_to_dict
from ettin_train.config.schema import Duration, Recipe

__all__ = ["Duration", "Recipe", "RecipeError", "load_recipe", "recipe_to_dict"]
