"""The embedding dock widget (issue 5): scatter plot of a segment layer's UMAP linked to the map,
labelling, label propagation and export. Needs only numpy and PyQGIS (scipy is used when present).
"""
